"""Benchmark of ``find_duplicates`` on synthetic SSCD-like descriptors with planted near-duplicates.

Data, two layouts (``LAYOUTS``): ``uniform``, unit vectors uniform on the 512-d sphere (background pairs
near cosine 0, max about 0.3 over 1e11 pairs); ``clustered``, Zipf-sized clusters of unit vectors around
random centres (``_fill_clustered``: dense regions, as real SSCD descriptors have, whose members are not
duplicates of each other). In both, 1% of the vectors are *sources* that get 1-3 noisy copies each at
cosine uniform in [0.85, 0.98] (copies of one source are similar to each other too, at about c1 * c2), so
at the 0.75 threshold the exact duplicate graph is the planted one.

``n`` set, each layout: cell sizes, fraction of all pairs compared, recall of the planted pairs, agreement
with an exact all-pairs search (faiss ``IndexFlatIP`` ``range_search`` over all N, in query batches) and the
speed ratio, in wall seconds and in CPU seconds of all threads (the machine may be shared: wall time then
depends on the neighbours' load; ``OMP_NUM_THREADS=1`` keeps both searches off each other's cores).
``n_large`` set (uniform): written to a temporary ``.npy`` and de-duplicated through the memory-mapped path;
wall time and peak memory (``VmHWM`` for the process lifetime, and the peaks of ``RssAnon`` (heap) and
``RssFile`` (mapped pages of the ``.npy``, page cache) sampled during the run).

    python -c "from data_curation.bench_dedup import run_dedup_benchmark as r; import json; print(json.dumps(r(), indent=2))"
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import faiss
import numpy as np

from data_curation.dedup import DedupConfig, _UnionFind, find_duplicates

GOALS = {"planted_pair_recall": 0.99, "speedup_vs_exact": 10.0, "large_wall_s": 300.0}
COPY_COS = (0.85, 0.98)
POINTS_PER_CLUSTER = 100  # clustered layout: N / 100 clusters
ZIPF_EXPONENT = 1.2  # at 50k: the largest cluster holds ~12k vectors, the median ~16
MEMBER_COS = (0.6, 0.8)  # cosine of a cluster member to its centre
CHUNK = 65536


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _fill_uniform(out: np.ndarray, rng: np.random.Generator) -> None:
    n, d = out.shape
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        out[s:e] = _unit(rng.standard_normal((e - s, d), dtype=np.float32))


def _fill_clustered(out: np.ndarray, rng: np.random.Generator) -> None:
    """Zipf-sized clusters (size of the r-th ~ r^-ZIPF_EXPONENT; N / POINTS_PER_CLUSTER of them) around
    random unit centres, each member at cosine uniform in MEMBER_COS from its centre, in a random direction
    otherwise: the dense regions of real descriptor sets (many photos of one landmark, product or meme
    template) that are not duplicates of each other (members of one cluster sit at cosine <= ~0.64)."""
    n, d = out.shape
    n_clusters = max(1, n // POINTS_PER_CLUSTER)
    weights = 1.0 / np.arange(1, n_clusters + 1) ** ZIPF_EXPONENT
    cluster = rng.permutation(np.repeat(np.arange(n_clusters), rng.multinomial(n, weights / weights.sum())))
    centres = _unit(rng.standard_normal((n_clusters, d), dtype=np.float32))
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        out[s:e] = _at_cosine(rng, centres[cluster[s:e]], MEMBER_COS)


def _at_cosine(rng: np.random.Generator, base: np.ndarray, cos_range: tuple[float, float]) -> np.ndarray:
    """(B, D) unit vectors at cosine uniform in ``cos_range`` from the unit rows of ``base``."""
    z = rng.standard_normal(base.shape, dtype=np.float32)
    z = _unit(z - (z * base).sum(1, keepdims=True) * base)  # orthogonal to the base
    c = rng.uniform(*cos_range, size=(len(base), 1)).astype(np.float32)
    return _unit(c * base + np.sqrt(1 - c * c) * z)


LAYOUTS = {"uniform": _fill_uniform, "clustered": _fill_clustered}


def make_planted(out: np.ndarray, seed: int = 0, dup_fraction: float = 0.01, layout: str = "uniform") -> np.ndarray:
    """Fill ``out`` (N, D) float32 (array or memmap) in chunks with unit vectors laid out as ``layout``
    (a key of ``LAYOUTS``), then overwrite random rows with copies; returns planted (source, copy) pairs
    (P, 2)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {sorted(LAYOUTS)}")
    n, d = out.shape
    rng = np.random.default_rng(seed)
    LAYOUTS[layout](out, rng)
    n_src = max(1, int(n * dup_fraction))
    counts = rng.integers(1, 4, n_src)
    n_copy = int(counts.sum())
    if n_src + n_copy > n:
        raise ValueError(f"n={n} is too small for {n_src} sources and {n_copy} copies")
    picked = rng.permutation(n)[:n_src + n_copy]  # copies at random positions, not appended
    src = np.repeat(picked[:n_src], counts)
    copies = picked[n_src:]
    order = np.argsort(copies)
    src, copies = src[order], copies[order]
    for s in range(0, n_copy, CHUNK):
        out[copies[s:s + CHUNK]] = _at_cosine(rng, np.asarray(out[src[s:s + CHUNK]], np.float32), COPY_COS)
    return np.stack([src, copies], axis=1).astype(np.int64)


def exact_flat_components(x: np.ndarray, threshold: float, batch: int = 4096) -> tuple[np.ndarray, int]:
    """Exact all-pairs search: faiss IndexFlatIP range_search of every vector against all N; union-find.
    Returns (labels, n_pairs)."""
    n, d = x.shape
    index = faiss.IndexFlatIP(d)
    index.add(np.ascontiguousarray(x, np.float32))
    # range_search keeps scores > radius for inner product; step below so that ">= threshold" holds.
    radius = float(np.nextafter(np.float32(threshold), np.float32(-2)))
    uf = _UnionFind(n)
    n_pairs = 0
    for s in range(0, n, batch):
        q = np.ascontiguousarray(x[s:s + batch], np.float32)
        lims, sims, ids = index.range_search(q, radius)
        lims = lims.astype(np.int64)  # faiss returns uint64
        rows = s + np.repeat(np.arange(len(q)), np.diff(lims))
        keep = (sims >= np.float32(threshold)) & (ids > rows)
        uf.union(rows[keep], ids[keep])
        n_pairs += int(keep.sum())
    return uf.labels(), n_pairs


class _MemSampler:
    """Peak RssAnon / RssFile / VmRSS (kB) sampled from /proc/self/status in a background thread."""

    def __init__(self, every_s: float = 0.2):
        self.every_s, self.peak = every_s, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> dict[str, int]:
        out = {}
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                key, _, val = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(val.split()[0])
        except OSError:  # not Linux
            pass
        return out

    def _run(self):
        while not self._stop.is_set():
            for k, v in self.read().items():
                self.peak[k] = max(self.peak.get(k, 0), v)
            self._stop.wait(self.every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[bench_dedup] {msg}", file=sys.stderr, flush=True)


def _pair_recall(labels: np.ndarray, pairs: np.ndarray) -> float:
    return float((labels[pairs[:, 0]] == labels[pairs[:, 1]]).mean()) if len(pairs) else 1.0


def _bench_small(n: int, dim: int, seed: int, layout: str, cfg: DedupConfig, progress: bool) -> dict:
    """Our search against exact all-pairs search on ``n`` in-memory vectors laid out as ``layout``."""
    _log(progress, f"small set ({layout}): generating {n} x {dim}")
    x = np.empty((n, dim), np.float32)
    pairs = make_planted(x, seed, layout=layout)
    _log(progress, f"small set ({layout}): IVF search")
    t, c = time.perf_counter(), time.process_time()
    res = find_duplicates(x, cfg, progress=progress)
    ours_s, ours_cpu = time.perf_counter() - t, time.process_time() - c
    _log(progress, f"small set ({layout}): IVF {ours_s:.1f} s; exact all-pairs flat range_search")
    t, c = time.perf_counter(), time.process_time()
    exact, exact_pairs = exact_flat_components(x, cfg.threshold)
    exact_s, exact_cpu = time.perf_counter() - t, time.process_time() - c
    _log(progress, f"small set ({layout}): exact {exact_s:.1f} s")
    linked = np.flatnonzero(res.labels != np.arange(n))  # i is in the same component as labels[i]
    n_removed, n_removed_exact = n - res.n_components, n - len(np.unique(exact))
    return {
        "layout": layout, "n": n, "planted_pairs": len(pairs),
        "cell_size": res.stats["cluster_size"],
        "compared_fraction_of_all_pairs": res.stats["compared_fraction_of_all_pairs"],
        "planted_pair_recall": _pair_recall(res.labels, pairs),
        "planted_pair_recall_exact": _pair_recall(exact, pairs),
        "n_pairs": res.n_pairs, "n_pairs_exact": exact_pairs,
        "pair_recall_vs_exact": res.n_pairs / max(1, exact_pairs),
        # every link we make must be a link of the exact graph (found pairs are exact similarities)
        "precision_vs_exact": float((exact[linked] == exact[res.labels[linked]]).mean()) if len(linked) else 1.0,
        "duplicates_removed": n_removed, "duplicates_removed_exact": n_removed_exact,
        "removed_recall_vs_exact": n_removed / max(1, n_removed_exact),
        "components_identical_to_exact": bool(np.array_equal(res.labels, exact)),
        "seconds": ours_s, "seconds_exact": exact_s, "speedup_vs_exact": exact_s / ours_s,
        # CPU seconds of all threads: on a shared machine wall time depends on the neighbours' load
        "cpu_seconds": ours_cpu, "cpu_seconds_exact": exact_cpu, "speedup_vs_exact_cpu": exact_cpu / ours_cpu,
        "load_average_1min": os.getloadavg()[0],
        "stats": res.stats,
    }


def run_dedup_benchmark(n: int = 100_000, n_large: int = 1_000_000, dim: int = 512, seed: int = 0,
                        progress: bool = True, cfg: DedupConfig = DedupConfig()) -> dict:
    """JSON-able figures: for each layout of ``LAYOUTS``, planted-pair recall, cell sizes, agreement with and
    speed against exact search on ``n`` vectors; wall time and peak memory on ``n_large`` memory-mapped
    uniform vectors (0 skips it)."""
    out: dict = {"config": asdict(cfg), "dim": dim, "seed": seed, "copy_cosine": list(COPY_COS),
                 "clustered_layout": {"points_per_cluster": POINTS_PER_CLUSTER, "zipf_exponent": ZIPF_EXPONENT,
                                      "member_cosine": list(MEMBER_COS)},
                 "faiss_threads": faiss.omp_get_max_threads(), "goals": dict(GOALS)}
    if n:
        out["small"] = {layout: _bench_small(n, dim, seed, layout, cfg, progress) for layout in LAYOUTS}
    if n_large:
        with tempfile.TemporaryDirectory(prefix="bench_dedup_") as tmp:
            path = Path(tmp) / "embeddings.npy"
            _log(progress, f"large set: writing {n_large} x {dim} float32 to {path}")
            t = time.perf_counter()
            mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n_large, dim))
            pairs = make_planted(mm, seed + 1)
            mm.flush()
            del mm
            gen_s = time.perf_counter() - t
            _log(progress, f"large set: written in {gen_s:.1f} s; IVF search via mmap")
            before = _MemSampler.read()
            with _MemSampler() as mem:
                t, c = time.perf_counter(), time.process_time()
                res = find_duplicates(path, cfg, progress=progress)
                wall, cpu = time.perf_counter() - t, time.process_time() - c
            after = _MemSampler.read()
            out["large"] = {
                "n": n_large, "planted_pairs": len(pairs), "file_bytes": os.path.getsize(path),
                "planted_pair_recall": _pair_recall(res.labels, pairs),
                "n_pairs": res.n_pairs, "duplicates_removed": res.n_duplicates,
                "wall_s": wall, "cpu_s": cpu, "generate_s": gen_s,
                "peak_rss_mb": {k: v / 1024 for k, v in mem.peak.items()},
                "rss_before_mb": {k: v / 1024 for k, v in before.items()},
                "vm_hwm_mb_process": after.get("VmHWM", 0) / 1024,
                "stats": res.stats,
            }
    met = {}
    for layout, small in out.get("small", {}).items():
        met[f"{layout}_planted_pair_recall"] = small["planted_pair_recall"] >= GOALS["planted_pair_recall"]
        met[f"{layout}_speedup_vs_exact"] = small["speedup_vs_exact"] >= GOALS["speedup_vs_exact"]
        met[f"{layout}_speedup_vs_exact_cpu"] = small["speedup_vs_exact_cpu"] >= GOALS["speedup_vs_exact"]
    if "large" in out:
        met["large_planted_pair_recall"] = out["large"]["planted_pair_recall"] >= GOALS["planted_pair_recall"]
        met["large_wall_s"] = out["large"]["wall_s"] <= GOALS["large_wall_s"]
    out["goals_met"] = met
    return out
