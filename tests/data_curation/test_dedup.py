"""FAISS de-duplication: clustered search + union-find against brute force, inputs, keepers, CLI, benchmark."""

import json

import numpy as np
import pytest

from data_curation import dedup
from data_curation.bench_dedup import exact_flat_components, make_planted, run_dedup_benchmark
from data_curation.dedup import (DedupConfig, EmbeddingsError, _bound_cells, _cell_centres, _cell_groups, _shares,
                                 _UnionFind, choose_keepers, exact_components, find_duplicates)
from scripts import dedup as dedup_cli


def unit(v):
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def copy_at(rng, base, cos):
    """A unit vector at cosine ``cos`` from unit ``base``."""
    z = rng.standard_normal(base.shape)
    z = unit(z - (z @ base) * base)
    return unit(cos * base + np.sqrt(1 - cos**2) * z)


def planted(seed=0, n_bg=1500, n_groups=80, n_chains=10, d=64):
    """Random unit background (pairwise cosine ~ N(0, 1/64): none near 0.75) plus groups of 1-4 copies at
    cosine 0.78-0.97 of a source, and chains a - b - c (0.8 each) whose ends are not duplicates (0.64)."""
    rng = np.random.default_rng(seed)
    rows = list(unit(rng.standard_normal((n_bg, d))))
    for _ in range(n_groups):
        src = unit(rng.standard_normal(d))
        rows += [src] + [copy_at(rng, src, rng.uniform(0.78, 0.97)) for _ in range(rng.integers(1, 5))]
    for _ in range(n_chains):
        a, z1, z2 = np.linalg.qr(rng.standard_normal((d, 3)))[0].T  # orthonormal
        b = unit(0.8 * a + 0.6 * z1)
        c = unit(0.8 * b + 0.6 * z2)  # z2 is orthogonal to a and b, so c . a = 0.64
        rows += [a, b, c]
    x = np.stack(rows).astype(np.float32)
    return x[rng.permutation(len(x))]


def brute_pairs(x, t):
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    return int(np.triu(s >= np.float32(t), 1).sum()), s.max(axis=1)


@pytest.mark.parametrize("n_clusters,probes", [(1, 1), (8, 8), (16, 8), (40, 12)])
def test_components_match_brute_force(n_clusters, probes):
    x = planted()
    ref = exact_components(x, 0.75)
    assert len(x) - len(np.unique(ref)) > 150  # there is something to find
    res = find_duplicates(x, DedupConfig(threshold=0.75, n_clusters=n_clusters, clusters_per_vector=probes))
    assert res.labels.dtype == np.int64 and res.n_duplicates == len(x) - res.n_components
    np.testing.assert_array_equal(ref[res.labels], ref)  # every link found is a link of the exact graph
    n_pairs, best = brute_pairs(x, 0.75)
    dup = best >= 0.75
    exact_nn = np.isclose(res.nn_similarity[dup], best[dup], atol=1e-5)
    assert (res.nn_similarity <= best + 1e-5).all()  # the best neighbour among the vectors compared
    if probes == n_clusters:  # every pair is compared (several times when k > 1) and counted once
        np.testing.assert_array_equal(res.labels, ref)
        assert res.n_pairs == n_pairs and exact_nn.all()
    else:  # half the cells probed: a pair may be missed, rarely a split (2 of 1366 linked vectors, 6 seeds)
        assert (res.labels != ref).sum() <= 0.01 * (ref != np.arange(len(x))).sum()
        assert 0.98 * n_pairs <= res.n_pairs <= n_pairs and exact_nn.mean() >= 0.99
    assert res.stats["n_clusters"] == n_clusters and res.stats["clusters_per_vector"] == probes
    if n_clusters == 1:
        np.testing.assert_allclose(res.nn_similarity, best, atol=1e-5)


@pytest.mark.parametrize("tasks_per_slot", [1, 50])
def test_ray_tasks_give_the_same_result_however_the_work_is_split(tmp_path, monkeypatch, tasks_per_slot):
    """Assignment batches and search groups are Ray tasks; how many (batch_size, tasks per CPU, workers) and
    whether rows come from a path or the object store changes nothing: all probes = brute force exactly, and
    fewer probes give one answer for every split."""
    x = planted(seed=3)
    np.save(tmp_path / "emb.npy", x)
    ref = exact_components(x, 0.75)
    n_pairs, best = brute_pairs(x, 0.75)
    full = DedupConfig(n_clusters=10, clusters_per_vector=10, batch_size=300)  # every pair compared
    part = DedupConfig(n_clusters=30, clusters_per_vector=6, batch_size=300)
    base = find_duplicates(x, part, workers=2)
    monkeypatch.setattr(dedup, "TASKS_PER_SLOT", tasks_per_slot)
    res = find_duplicates(tmp_path / "emb.npy", full, workers=1)
    np.testing.assert_array_equal(res.labels, ref)
    assert res.n_pairs == n_pairs and res.stats["comparisons"] == len(x) ** 2
    np.testing.assert_allclose(res.nn_similarity, best, atol=1e-5)
    for rows in (x, tmp_path / "emb.npy"):
        again = find_duplicates(rows, part, workers=1)
        np.testing.assert_array_equal(again.labels, base.labels)
        np.testing.assert_array_equal(again.nn_similarity, base.nn_similarity)
        assert again.n_pairs == base.n_pairs and again.stats["comparisons"] == base.stats["comparisons"]


def test_cell_groups_cover_every_non_empty_cell_once_in_balanced_runs():
    rng = np.random.default_rng(0)
    db_ptr = np.concatenate([[0], np.cumsum(rng.integers(0, 50, 300))])
    q_ptr = np.concatenate([[0], np.cumsum(rng.integers(0, 500, 300))])
    groups = _cell_groups(db_ptr, q_ptr, 8)
    assert len(groups) <= 8
    np.testing.assert_array_equal(np.concatenate(groups), np.flatnonzero(np.diff(db_ptr) > 0))
    cost = [(np.diff(q_ptr)[g] * np.diff(db_ptr)[g]).sum() for g in groups]
    assert max(cost) <= sum(cost) / 8 + (np.diff(q_ptr) * np.diff(db_ptr)).max()
    assert [len(g) for g in _cell_groups(db_ptr, q_ptr, 1)] == [int((np.diff(db_ptr) > 0).sum())]


def test_chain_ends_join_through_the_middle_only():
    rng = np.random.default_rng(1)
    a, z1, z2 = np.linalg.qr(rng.standard_normal((16, 3)))[0].T
    b = unit(0.8 * a + 0.6 * z1)
    c = unit(0.8 * b + 0.6 * z2)
    x = np.stack([c, unit(rng.standard_normal(16)), a, b])  # a . c = 0.64
    res = find_duplicates(x, DedupConfig(threshold=0.75))
    np.testing.assert_array_equal(res.labels, [0, 1, 0, 0])
    assert res.n_pairs == 2
    np.testing.assert_array_equal(find_duplicates(x[[0, 2]], DedupConfig(threshold=0.75)).labels, [0, 1])


def test_pairs_straddling_a_cluster_border_need_more_than_one_probe():
    """Two dense-ish blobs pin the 2 k-means centroids; each planted pair has one end on either side of
    the bisector, so with one probe per vector every pair is missed, with two all are found."""
    rng = np.random.default_rng(0)
    d = 64
    u, v = np.linalg.qr(rng.standard_normal((d, 2)))[0].T
    blobs = [copy_at(rng, centre, 0.6) for centre in (u, v) for _ in range(150)]  # blob pairs ~0.36
    pairs = []
    for _ in range(6):
        z = rng.standard_normal(d)
        z = unit(z - (z @ u) * u - (z @ v) * v)  # orthogonal to both centres
        w = 0.5 * unit(u + v) + np.sqrt(0.75) * z  # on the bisector; different pairs ~0.25 apart
        pairs += [unit(w + 0.2 * (u - v)), unit(w - 0.2 * (u - v))]  # cosine 0.85, opposite sides
    x = np.stack(blobs + pairs).astype(np.float32)
    ref = exact_components(x, 0.75)
    assert len(np.unique(ref)) == len(x) - 6
    one = find_duplicates(x, DedupConfig(n_clusters=2, clusters_per_vector=1))
    assert one.n_pairs == 0 and one.n_components == len(x)
    two = find_duplicates(x, DedupConfig(n_clusters=2, clusters_per_vector=2))
    np.testing.assert_array_equal(two.labels, ref)


def test_threshold_is_inclusive():
    y = np.array([0.75, np.sqrt(1 - 0.75**2)], np.float32)
    x = np.stack([np.array([1.0, 0.0], np.float32), y])
    assert np.float32(x[0] @ x[1]) == np.float32(0.75)
    at = find_duplicates(x, DedupConfig(threshold=0.75))
    above = find_duplicates(x, DedupConfig(threshold=float(np.nextafter(np.float32(0.75), np.float32(1)))))
    np.testing.assert_array_equal(at.labels, [0, 0])
    np.testing.assert_array_equal(above.labels, [0, 1])
    np.testing.assert_array_equal(exact_components(x, 0.75), [0, 0])
    assert find_duplicates(planted(n_groups=5, n_bg=50), DedupConfig(threshold=-1.0)).n_components == 1
    assert find_duplicates(x, DedupConfig(threshold=1.0)).n_components == 2


def test_config_validation_and_edge_sizes():
    with pytest.raises(ValueError, match="threshold"):
        DedupConfig(threshold=1.5)
    with pytest.raises(ValueError, match="clusters_per_vector"):
        DedupConfig(clusters_per_vector=0)
    with pytest.raises(ValueError, match="max_cell_size must be >= 1 or None, got 0"):
        DedupConfig(max_cell_size=0)
    empty = find_duplicates(np.zeros((0, 8), np.float32))
    assert empty.n_components == 0 and empty.labels.shape == (0,)
    single = find_duplicates(unit(np.ones((1, 8))))
    assert single.labels.tolist() == [0] and single.nn_similarity.tolist() == [-1.0]
    # more clusters or probes than vectors are clipped
    x = planted(n_bg=30, n_groups=3, n_chains=0)
    res = find_duplicates(x, DedupConfig(n_clusters=500, clusters_per_vector=900))
    np.testing.assert_array_equal(res.labels, exact_components(x, 0.75))


def test_mmap_npy_matches_in_memory(tmp_path):
    x = planted(seed=2)
    np.save(tmp_path / "emb.npy", x)
    cfg = DedupConfig(n_clusters=12, clusters_per_vector=6, batch_size=500)
    mem, mm = find_duplicates(x, cfg), find_duplicates(tmp_path / "emb.npy", cfg)
    np.testing.assert_array_equal(mm.labels, mem.labels)
    np.testing.assert_array_equal(mm.nn_similarity, mem.nn_similarity)
    assert mm.n_pairs == mem.n_pairs
    np.save(tmp_path / "emb16.npy", x.astype(np.float16))  # half-precision storage is accepted
    half = find_duplicates(str(tmp_path / "emb16.npy"), DedupConfig(n_clusters=1))
    np.testing.assert_array_equal(half.labels, exact_components(x.astype(np.float16).astype(np.float32), 0.75))


def test_input_errors(tmp_path):
    x = planted(n_bg=100, n_groups=5, n_chains=0)
    bad = x.copy()
    bad[7] *= 3
    with pytest.raises(ValueError, match="L2-normalised: row 7 has norm 3"):
        find_duplicates(bad)
    np.save(tmp_path / "bad.npy", bad)
    with pytest.raises(EmbeddingsError, match="bad.npy: .*row 7"):
        find_duplicates(tmp_path / "bad.npy", DedupConfig(n_clusters=4, clusters_per_vector=2))
    fixed = find_duplicates(bad, DedupConfig(normalize=True))
    np.testing.assert_array_equal(fixed.labels, find_duplicates(x).labels)
    zero = x.copy()
    zero[3] = 0
    with pytest.raises(EmbeddingsError, match="row 3 has norm 0"):
        find_duplicates(zero, DedupConfig(normalize=True))
    with pytest.raises(EmbeddingsError, match="nope.npy: embeddings file not found"):
        find_duplicates(tmp_path / "nope.npy")
    (tmp_path / "text.npy").write_text("hello")
    with pytest.raises(EmbeddingsError, match="text.npy: not a readable .npy"):
        find_duplicates(tmp_path / "text.npy")
    with pytest.raises(EmbeddingsError, match=r"\(N, D\) float"):
        find_duplicates(np.ones(5, np.float32))
    with pytest.raises(EmbeddingsError, match=r"\(N, D\) float"):
        find_duplicates(np.ones((5, 3), np.int64))


def test_union_find_long_chains_and_stars():
    n = 5000
    rng = np.random.default_rng(0)
    uf = _UnionFind(n)
    perm = rng.permutation(n)
    uf.union(perm[:-1], perm[1:])  # one long path in random order
    assert (uf.labels() == 0).all()
    uf = _UnionFind(n)
    uf.union(np.full(n - 1, n - 1), np.arange(n - 1))  # a star centred on the largest index
    uf.union(np.array([3]), np.array([3]))
    assert (uf.labels() == 0).all()
    uf = _UnionFind(10)
    uf.union(np.array([9, 8, 5]), np.array([8, 7, 2]))
    assert uf.labels().tolist() == [0, 1, 2, 3, 4, 2, 6, 7, 7, 7]


def test_choose_keepers():
    labels = np.array([0, 0, 2, 0, 2, 5])
    assert choose_keepers(labels).tolist() == [True, False, True, False, False, True]
    clip = np.array([0.1, 0.3, 0.2, 0.3, np.nan, 0.0])
    assert choose_keepers(labels, "clip", clip_scores=clip).tolist() == [False, True, True, False, False, True]
    lengths = np.array([5, 9, 3, 12, 30, 1])
    assert choose_keepers(labels, "longest_caption", caption_lengths=lengths).tolist() == \
        [False, False, False, True, True, True]
    # arbitrary (non-index) component ids work too; exactly one keeper per component
    keep = choose_keepers(np.array([7, 3, 7, 3, 9]), "clip", clip_scores=np.array([1, 2, 3, 2, 0.5]))
    assert keep.tolist() == [False, True, True, False, True]
    with pytest.raises(ValueError, match="needs clip_scores"):
        choose_keepers(labels, "clip")
    with pytest.raises(ValueError, match=r"caption_lengths must be .* shape \(6,\)"):
        choose_keepers(labels, "longest_caption", caption_lengths=np.ones(5))
    with pytest.raises(ValueError, match="unknown keep rule"):
        choose_keepers(labels, "random")
    with pytest.raises(ValueError, match="1-D integer"):
        choose_keepers(np.array([0.0, 1.0]))


def test_cli_writes_components_keepers_and_stats(tmp_path, capsys):
    x = planted(n_bg=300, n_groups=20)
    np.save(tmp_path / "emb.npy", x)
    scores = np.random.default_rng(0).random(len(x))
    np.save(tmp_path / "clip.npy", scores)
    out = tmp_path / "out"
    argv = [str(tmp_path / "emb.npy"), "--threshold", "0.75", "--out", str(out), "--clusters", "6",
            "--clusters-per-vector", "3", "--max-cell-size", "150", "--keep", "clip", "--scores",
            str(tmp_path / "clip.npy"), "--json"]
    assert dedup_cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    labels, keep = np.load(out / "components.npy"), np.load(out / "keep.npy")
    ref = find_duplicates(x, DedupConfig(threshold=0.75, n_clusters=6, clusters_per_vector=3, max_cell_size=150)).labels
    np.testing.assert_array_equal(labels, ref)
    np.testing.assert_array_equal(keep, choose_keepers(ref, "clip", clip_scores=scores))
    assert summary["n"] == len(x) and summary["n_components"] == len(np.unique(ref))
    assert summary["n_duplicates_removed"] == len(x) - keep.sum() and summary["seconds"] > 0
    stats = json.loads((out / "dedup_stats.json").read_text())
    assert stats["dedup"]["cell_bound"]["cap"] == 150 and stats["dedup"]["cluster_size"]["max"] <= 150
    assert stats["dedup"]["n_clusters"] == 6 and np.load(out / "nn_similarity.npy").shape == (len(x),)
    # default output folder and human-readable summary
    assert dedup_cli.main([str(tmp_path / "emb.npy")]) == 0
    assert "duplicates removed" in capsys.readouterr().out
    assert (tmp_path / "emb_dedup" / "keep.npy").is_file()


def test_cli_bad_input_exits_2_naming_the_file(tmp_path, capsys):
    assert dedup_cli.main([str(tmp_path / "missing.npy")]) == 2
    assert "missing.npy" in capsys.readouterr().err
    np.save(tmp_path / "raw.npy", np.full((10, 4), 2.0, np.float32))
    assert dedup_cli.main([str(tmp_path / "raw.npy")]) == 2
    err = capsys.readouterr().err
    assert "raw.npy" in err and "L2-normalised" in err
    assert dedup_cli.main([str(tmp_path / "raw.npy"), "--normalize", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_components"] == 1
    np.save(tmp_path / "ok.npy", unit(np.ones((10, 4))))
    assert dedup_cli.main([str(tmp_path / "ok.npy"), "--keep", "clip"]) == 2
    assert "needs --scores" in capsys.readouterr().err
    np.save(tmp_path / "short.npy", np.ones(3))
    assert dedup_cli.main([str(tmp_path / "ok.npy"), "--keep", "clip", "--scores", str(tmp_path / "short.npy")]) == 2
    assert "short.npy" in capsys.readouterr().err
    assert dedup_cli.main([str(tmp_path / "ok.npy"), "--workers", "0"]) == 2
    assert "workers must be a whole number >= 1, got 0" in capsys.readouterr().err
    assert dedup_cli.main([str(tmp_path / "ok.npy"), "--address", "127.0.0.1:1"]) == 2
    assert "cannot reach the Ray cluster at '127.0.0.1:1'" in capsys.readouterr().err
    assert not (tmp_path / "ok_dedup").exists()  # nothing written on bad input


def test_benchmark_tiny_configuration():
    out = run_dedup_benchmark(n=2000, n_large=3000, dim=64, progress=False,
                              cfg=DedupConfig(n_clusters=8, clusters_per_vector=3))
    json.dumps(out)  # JSON-able
    assert set(out["small"]) == {"uniform", "clustered"}
    for layout, small in out["small"].items():
        assert small["layout"] == layout
        assert small["planted_pair_recall_exact"] == 1.0 and small["planted_pair_recall"] >= 0.95
        assert small["precision_vs_exact"] == 1.0
        assert small["duplicates_removed"] <= small["duplicates_removed_exact"]
        assert small["cell_size"]["max"] <= small["stats"]["cell_bound"]["cap"]
        assert 0 < small["compared_fraction_of_all_pairs"] < 1
    large = out["large"]
    assert large["n"] == 3000 and large["planted_pair_recall"] >= 0.95 and large["wall_s"] > 0
    assert set(out["goals_met"]) >= {"uniform_planted_pair_recall", "clustered_planted_pair_recall",
                                     "clustered_speedup_vs_exact", "large_wall_s"}


def test_planted_data_and_exact_flat_search():
    x = np.empty((3000, 32), np.float32)
    pairs = make_planted(x, seed=3)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    sims = (x[pairs[:, 0]] * x[pairs[:, 1]]).sum(1)
    assert sims.min() >= 0.85 - 1e-5 and sims.max() <= 0.98 + 1e-5
    labels, n_pairs = exact_flat_components(x, 0.75, batch=700)
    np.testing.assert_array_equal(labels, exact_components(x, 0.75))
    assert n_pairs == brute_pairs(x, 0.75)[0]


def pair_recall(labels, x, t=0.75):
    """Fraction of the brute-force duplicate pairs whose ends share a component."""
    s = x @ x.T
    i, j = np.nonzero(np.triu(s >= np.float32(t), 1))
    assert len(i) > 50  # there is something to find
    return float((labels[i] == labels[j]).mean())


@pytest.mark.parametrize("layout", ["uniform", "clustered"])
def test_recall_cell_bound_and_cost_on_both_layouts(layout):
    """Zipf-sized clusters used to leave a few hub cells holding most of each big cluster, probed by all
    its members; the residual cells keep every cell under the cap and the compared fraction near the
    uniform case's probes / k, with recall >= 0.99 against brute force."""
    x = np.empty((6000, 128), np.float32)
    make_planted(x, seed=1, layout=layout)
    cfg = DedupConfig(n_clusters=120, clusters_per_vector=12)
    res = find_duplicates(x, cfg)
    cap = res.stats["cell_bound"]["cap"]
    assert cap == int(np.ceil(4 * 6000 / 120))
    assert res.stats["cluster_size"]["max"] <= cap and res.stats["cell_bound"]["cells_over_cap"] == 0
    assert res.stats["compared_fraction_of_all_pairs"] <= 1.2 * 12 / 120  # raw k-means cells: 0.15 clustered
    assert pair_recall(res.labels, x) >= 0.99
    again = find_duplicates(x, cfg)  # deterministic for a seed
    np.testing.assert_array_equal(again.labels, res.labels)
    assert again.stats["cluster_size"] == res.stats["cluster_size"] and again.n_pairs == res.n_pairs


def test_clustered_layout_is_clustered_and_validated():
    x = np.empty((4000, 64), np.float32)
    pairs = make_planted(x, seed=0, layout="clustered")
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    sims = (x[pairs[:, 0]] * x[pairs[:, 1]]).sum(1)
    assert sims.min() >= 0.85 - 1e-5 and sims.max() <= 0.98 + 1e-5
    # Zipf sizes (40 clusters): members of one cluster sit at cosine ~0.5, unrelated rows at ~0 +- 0.13,
    # so the rows near a row are its cluster: over a fifth of all rows for the largest, few for the smallest
    near = (x @ x.T > 0.3).sum(1)
    assert near.max() > 0.2 * len(x) and near.min() < 0.02 * len(x)
    uniform = np.empty_like(x)
    make_planted(uniform, seed=0)
    assert (uniform @ uniform.T > 0.3).sum(1).max() < 0.02 * len(x)
    with pytest.raises(ValueError, match="unknown layout 'ring'"):
        make_planted(x, layout="ring")


def test_bound_cells_keeps_the_most_similar_and_moves_the_rest_down_their_probes():
    # cap 2: four vectors start in cell 0, the two most similar stay; 2 and 3 move to cell 1, where vector 4
    # (home 1, as similar as 3 but later) is then the one turned away, to cell 2
    ids = np.array([[0, 1, 2], [0, 2, 1], [0, 1, 2], [0, 1, 2], [1, 2, 0]], np.int32)
    sims = np.array([[0.9, 0.5, 0.1], [0.8, 0.7, 0.1], [0.7, 0.6, 0.1], [0.6, 0.5, 0.4], [0.5, 0.4, 0.3]],
                    np.float16)
    out, stats = _bound_cells(ids.copy(), sims, k=3, cap=2)
    np.testing.assert_array_equal(out[:, 0], [0, 0, 1, 1, 2])
    assert stats == {"cap": 2, "rounds": 2, "moved": 3, "cells_over_cap": 0}
    # each row still holds the same probes, home first
    np.testing.assert_array_equal(np.sort(out, axis=1), np.sort(ids, axis=1))
    # more near-identical rows than probes * cap: the last probe keeps the overflow, and the stats say so
    same = np.tile(np.array([[0, 1]], np.int32), (5, 1))
    out, stats = _bound_cells(same, np.full((5, 2), 0.5, np.float16), k=2, cap=2)
    assert np.bincount(out[:, 0]).tolist() == [2, 3] and stats["cells_over_cap"] == 1 and stats["moved"] == 3


def test_cells_of_a_dense_cluster_all_hold_the_same_share_of_its_centre():
    """No cell centre can become a hub: each sits at the members' mean cosine to the coarse centroid, in a
    direction of the residuals."""
    rng = np.random.default_rng(0)
    mu = unit(rng.standard_normal(32))
    members = np.stack([copy_at(rng, mu, c) for c in rng.uniform(0.6, 0.8, 400)]).astype(np.float32)
    centres = _cell_centres(members, mu, 8, DedupConfig(), gpu=False)
    assert centres.shape == (8, 32)
    np.testing.assert_allclose(np.linalg.norm(centres, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(centres @ mu, (members @ mu).mean(), atol=1e-5)
    # rows equal to the centroid have no residual direction: one cell, the centroid itself
    same = np.tile(mu, (5, 1)).astype(np.float32)
    np.testing.assert_array_equal(_cell_centres(same, mu, 3, DedupConfig(), gpu=False), mu[None])


def test_shares_split_cells_in_proportion_with_at_least_one_each():
    assert _shares(np.array([100, 5, 0, 1, 50]), 10).tolist() == [6, 1, 0, 1, 2]
    assert _shares(np.array([10, 10, 10]), 7).tolist() == [3, 2, 2]
    assert _shares(np.array([1, 1]), 5).tolist() == [1, 1]  # never more cells than sample points
    assert _shares(np.array([100, 1, 1, 1]), 6).tolist() == [3, 1, 1, 1]  # the minimum of 1 comes off the largest
    assert _shares(np.array([100, 1, 1, 1]), 4).tolist() == [1, 1, 1, 1]
