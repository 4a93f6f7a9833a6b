"""Near-duplicate image removal over SSCD descriptors (Llama 3 sec. 7.1): every pair with cosine similarity
>= threshold is an edge, connected components of that graph are duplicate groups, one image-text pair is
kept per component.

Search (never materialises N x N; embeddings may be a memory-mapped ``.npy`` larger than RAM):

1. Cells, trained on a random sample of the descriptors (``_train_partition``): spherical k-means
   (``faiss.Kmeans(spherical=True)``) into ``sqrt(k)`` *coarse* cells, then every coarse cell split into
   cells in proportion to its share of the sample by spherical k-means on its members' *residuals* (``_cell_centres``).
2. One streaming pass in ``batch_size`` rows: each vector's ``clusters_per_vector`` most similar cell
   centres (its *probes*). The pass also checks the rows are unit-norm.
3. Cell bound: each vector's *home* is its first probe, unless that cell already holds ``max_cell_size``
   vectors more similar to its centre; then its next probe (deferred acceptance, ``_bound_cells``).
4. For every cell c, the vectors that probe c are compared exactly (float32 matrix products, in blocks of
   bounded size) with the vectors whose home is c. A pair (i, j) is found when
   ``home(j)`` is among i's probes or ``home(i)`` among j's: IVF search with nprobe = ``clusters_per_vector``,
   run symmetrically. This is asymmetric on purpose: assigning *both* sides to their top-k clusters finds a
   few more pairs but costs k^2 instead of k comparisons per pair (measured on 100k uniform 512-d vectors:
   top-3 on both sides, 0.9% of all pairs compared, recall 0.988; probing 8 clusters, 0.8% compared,
   recall 0.996).
5. Global union-find over all found edges (vectorised numpy, hooking the larger root under the smaller),
   so components that span clusters are joined; the component id is its smallest member index.

Why two levels (step 1): real descriptors cluster (many photos of one landmark, product or meme template).
In a dense cluster every member shares the cluster's direction and differs from the others only by small,
near-isotropic noise, so a member's similarity to a centroid inside the cluster is set by how much of the
cluster's direction that centroid holds (more, the more members it averages), not by the member's own
noise: one-level k-means leaves a few *hub* cells that hold most of a cluster and that all its members
probe. On 50k vectors in Zipf-sized clusters (``bench_dedup``, ``layout="clustered"``) that gave cells of
1 / 5 / 2,675 vectors (min / median / max) and 8.3% of all pairs compared, against 2.2% on uniform vectors.
The coarse level finds the clusters; inside one, the cells are split by the members' own directions and
every cell centre is put at the same cosine to the coarse centroid (the members' mean), so no cell can
outbid the others, and a dense cluster's members probe its own cells. Same data: 1 / 38 / 641 vectors,
2.37% of all pairs, planted-pair recall 1.0; at 100k, 1.55% and 0.9995 (1.59% and 0.9885 when the cells
were k-means on residuals shared by all coarse cells: dense members then probed other clusters' cells).
Uniform data is unchanged (2.19%, recall 0.999). The bound (step 3, default 4x the mean cell size) caps
what is left: 1 / 39 / 183 vectors, 3,177 vectors (6%) stored in a lower probe, same recall and cost.

Found pairs are exact (their similarity is computed, not estimated), so the result is a refinement of the
exact components: a missed pair can split a component, a spurious pair cannot appear. ``exact_components``
is the brute-force reference for tests.

Cost per vector is about ``k`` centroid products (assignment) plus ``clusters_per_vector * N / k`` products
(search), minimised at ``k = sqrt(clusters_per_vector * N)``, the default (~4,900 for 1M vectors with 24
probes, ~1,550 for 100k). On uniform random 512-d data the recall of planted pairs at cosine 0.85-0.98 falls
as k grows at fixed probes: 8 probes gave 0.991 at 100k but 0.967 at 1M, 16 probes 0.989 at 1M, hence 24.
k-means only has to give a balanced partition: the sample defaults to 16 points per centroid, capped at
``N / kmeans_iters`` so it costs no more than the assignment pass (faiss's 256/centroid would cost more than
everything else together at k = 4,900; taking random sample points as centroids lost only 0.003 recall at
100k). faiss's "at least 39 points per centroid" warning is silenced on purpose.

Measured figures: ``data_curation/bench_dedup.py``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np

NORM_ATOL = 1e-2  # |norm - 1| allowed per row (float16 storage rounds at ~1e-3)
EXACT_BELOW = 4096  # n_clusters=None: below this many vectors one cluster, i.e. exact all-pairs
BLOCK_ELEMS = 1 << 24  # similarity block (rows x cols) computed at once: 64 MB of float32
KEEP_RULES = ("first", "clip", "longest_caption")
RESIDUAL_MIN_NORM = 1e-3  # sin of the angle to the coarse centroid below which a row has no residual direction
CAP_OVER_MEAN = 4  # max_cell_size=None: this many times the mean cell size N / n_clusters


class EmbeddingsError(ValueError):
    """Embeddings that cannot be de-duplicated: missing or unreadable file, wrong shape or dtype, rows
    that are not unit-norm."""


@dataclass(frozen=True)
class DedupConfig:
    threshold: float = 0.75  # cosine; pairs >= threshold are duplicates (SSCD README: > 0.75 ~ 90% precision)
    n_clusters: int | None = None  # None: 1 below EXACT_BELOW vectors, else round(sqrt(clusters_per_vector * N))
    clusters_per_vector: int = 24  # probes per vector (IVF nprobe); 1 loses pairs straddling cluster borders
    kmeans_iters: int = 10
    max_cell_size: int | None = None  # vectors stored per cell; None: CAP_OVER_MEAN * N / n_clusters
    max_train_points: int | None = None  # k-means sample; None: 16/centroid, at most N / kmeans_iters
    batch_size: int = 65536  # rows per streaming batch (assignment pass)
    seed: int = 0
    use_gpu: bool | None = None  # None: faiss-gpu for k-means + assignment when faiss.get_num_gpus() > 0
    normalize: bool = False  # L2-normalise rows on read instead of raising on non-unit rows

    def __post_init__(self):
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {self.threshold}")
        for name in ("clusters_per_vector", "kmeans_iters", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_clusters", "max_cell_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {getattr(self, name)}")


@dataclass
class DedupResult:
    labels: np.ndarray  # (N,) int64 component id = smallest member index (a singleton's own index)
    n_components: int
    n_pairs: int  # distinct pairs found with similarity >= threshold
    nn_similarity: np.ndarray  # (N,) float32 best similarity to another vector among those compared; -1 if none
    stats: dict = field(default_factory=dict)  # config, timings, cluster sizes, comparisons

    @property
    def n_duplicates(self) -> int:
        """Vectors removed when one per component is kept."""
        return len(self.labels) - self.n_components


# ---------------------------------------------------------------------------------------------- input


def open_embeddings(embeddings: np.ndarray | str | Path) -> np.ndarray:
    """An (N, D) float array, or a ``.npy`` path opened memory-mapped; ``EmbeddingsError`` names the file."""
    if isinstance(embeddings, (str, Path)):
        path = Path(embeddings)
        if not path.is_file():
            raise EmbeddingsError(f"{path}: embeddings file not found")
        try:
            x = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as e:  # not a .npy, truncated header, object arrays
            raise EmbeddingsError(f"{path}: not a readable .npy array ({type(e).__name__}: {e})") from e
        where = str(path)
    else:
        x, where = embeddings, "embeddings"
    if not isinstance(x, np.ndarray) or x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
        shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", type(x).__name__)
        raise EmbeddingsError(f"{where}: expected an (N, D) float array, got shape {shape} dtype {dtype}")
    if x.shape[1] < 1:
        raise EmbeddingsError(f"{where}: zero-width embeddings, shape {x.shape}")
    return x


def _read_rows(x: np.ndarray, rows, normalize: bool, first_row: int = 0, check: bool = True) -> np.ndarray:
    """Rows as contiguous float32, checked (or made) unit-norm; ``check=False`` for rows already checked."""
    v = np.ascontiguousarray(x[rows], dtype=np.float32)
    if not (check or normalize):
        return v
    norms = np.linalg.norm(v, axis=1)
    if normalize:
        bad = ~(norms > 0) | ~np.isfinite(norms)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise EmbeddingsError(f"row {_row_id(rows, i, first_row)} has norm {norms[i]} and cannot be normalised")
        return v / norms[:, None]  # not in place: a float32 memmap slice is a read-only view
    bad = ~(np.abs(norms - 1.0) <= NORM_ATOL)  # catches NaN too
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise EmbeddingsError(f"embeddings must be L2-normalised: row {_row_id(rows, i, first_row)} has norm "
                              f"{norms[i]:.4g} ({int(bad.sum())} bad rows in this batch); pass normalize=True "
                              f"(--normalize) to normalise on read")
    return v


def _row_id(rows, i: int, first_row: int) -> int:
    return int(rows[i]) if isinstance(rows, np.ndarray) else first_row + i


# ------------------------------------------------------------------------------------------ union-find


class _UnionFind:
    """Vectorised union-find over int64 parents; a root is always the smallest index of its set."""

    def __init__(self, n: int):
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, x: np.ndarray) -> np.ndarray:
        p = self.parent
        r = p[x]
        while True:
            rr = p[r]
            if np.array_equal(rr, r):
                return r
            r = rr

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
        while a.size:
            ra, rb = self.find(a), self.find(b)
            keep = ra != rb
            if not keep.any():
                break
            a, b, ra, rb = a[keep], b[keep], ra[keep], rb[keep]
            # Hook each larger root under the smallest root it meets; unhooked edges go round again.
            np.minimum.at(self.parent, np.maximum(ra, rb), np.minimum(ra, rb))
            self.parent[a] = self.find(a)  # shorten the paths just lengthened
            self.parent[b] = self.find(b)

    def labels(self) -> np.ndarray:
        p = self.parent
        while True:
            pp = p[p]
            if np.array_equal(pp, p):
                return p.copy()
            p = pp


# ------------------------------------------------------------------------------------------ search


def _default_clusters(n: int, probes: int) -> int:
    return 1 if n <= EXACT_BELOW else int(round(np.sqrt(probes * n)))


def _coarse_clusters(k: int) -> int:
    # Enough to give the dense clusters their own coarse cells; measured at 100k clustered: sqrt(k) / 2,
    # sqrt(k), 2 sqrt(k) coarse cells gave recall 0.9995 / 0.9995 / 0.999 and 1.61 / 1.55 / 1.69% compared.
    return max(1, int(round(np.sqrt(k))))


def _default_cap(n: int, k: int) -> int:
    return int(np.ceil(CAP_OVER_MEAN * n / k))


def _resolve_gpu(use_gpu: bool | None) -> bool:
    n_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if use_gpu and n_gpus == 0:
        raise ValueError("use_gpu=True but faiss sees no GPU (install faiss-gpu, or leave use_gpu=None)")
    return n_gpus > 0 if use_gpu is None else bool(use_gpu)


def _train_sample(x: np.ndarray, k: int, cfg: DedupConfig) -> np.ndarray:
    """The k-means sample, rows checked: 16 points per centroid, but at most N / iters so that k-means costs
    no more than the assignment pass (about N * k products), and at least 4 per centroid."""
    n = x.shape[0]
    default = max(4 * k, min(16 * k, n // cfg.kmeans_iters))
    n_train = min(n, max(k, cfg.max_train_points or default))
    rng = np.random.default_rng(cfg.seed)
    sample = np.sort(rng.choice(n, size=n_train, replace=False)) if n_train < n else np.arange(n)
    return _read_rows(x, sample, cfg.normalize)


def _kmeans(xs: np.ndarray, k: int, cfg: DedupConfig, gpu: bool) -> np.ndarray:
    """(k, D) unit centroids of spherical k-means on all of ``xs``."""
    km = faiss.Kmeans(xs.shape[1], k, niter=cfg.kmeans_iters, seed=cfg.seed, spherical=True, gpu=gpu,
                      verbose=False, min_points_per_centroid=1, max_points_per_centroid=len(xs) // k + 1)
    km.train(xs)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def _flat_index(centroids: np.ndarray, gpu: bool):
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index) if gpu else index


def _cell_centres(members: np.ndarray, mu: np.ndarray, k: int, cfg: DedupConfig, gpu: bool) -> np.ndarray:
    """(k', D) unit centres (k' <= k) of the cells of one coarse cell with centroid ``mu`` (D,), from its
    (n, D) sample ``members``: spherical k-means on the members' *residuals* (each row minus its component
    along ``mu``, renormalised: the direction that tells the members of a dense cluster apart), each residual
    centroid then put back at the members' mean cosine to ``mu``. Every cell of a coarse cell so has the same
    share of ``mu``: none can become a hub by averaging more members (module docstring). Rows (almost) equal
    to ``mu`` have no residual direction and train nothing; with fewer than 2 directions the coarse cell is
    one cell, ``mu``."""
    cos = members @ mu
    r = members - cos[:, None] * mu
    norm = np.linalg.norm(r, axis=1)
    has_dir = norm >= RESIDUAL_MIN_NORM
    k = min(k, int(has_dir.sum()))
    if k < 2:
        return mu[None]
    dirs = _kmeans(np.ascontiguousarray(r[has_dir] / norm[has_dir, None]), k, cfg, gpu)
    dirs -= (dirs @ mu)[:, None] * mu  # orthogonal to mu up to k-means' rounding: make it exact
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    c = float(np.clip(cos.mean(), -1.0, 1.0))
    return (c * mu + np.sqrt(1.0 - c * c) * dirs).astype(np.float32)


@dataclass
class _Partition:
    """The trained cells, searched by plain inner product with the rows."""
    centres: np.ndarray  # (k, D) unit
    coarse_clusters: int
    train_points: int


def _train_partition(x: np.ndarray, k: int, cfg: DedupConfig, gpu: bool) -> _Partition:
    """``k`` cells: coarse spherical k-means on the sample, then each coarse cell split by ``_cell_centres``
    into cells in proportion to its share of the sample (``_shares``)."""
    xs = _train_sample(x, k, cfg)
    coarse = _kmeans(xs, _coarse_clusters(k), cfg, gpu)
    owner = _flat_index(coarse, gpu).search(xs, 1)[1][:, 0]
    sizes = np.bincount(owner, minlength=len(coarse))
    parts = [_cell_centres(xs[owner == o], coarse[o], int(share), cfg, gpu)
             for o, share in enumerate(_shares(sizes, k)) if share > 0]
    return _Partition(np.ascontiguousarray(np.concatenate(parts)), len(coarse), len(xs))


def _shares(sizes: np.ndarray, k: int) -> np.ndarray:
    """``k`` split in proportion to ``sizes`` (largest remainders), at least 1 and at most ``size`` for every
    non-empty entry; sums to ``k`` whenever ``k`` lies between the number of non-empty entries and their
    total."""
    quota = k * sizes / sizes.sum()
    share = np.minimum(sizes, np.maximum(np.floor(quota), sizes > 0)).astype(np.int64)
    while (step := int(np.sign(k - share.sum()))) != 0:
        room = share < sizes if step > 0 else share > 1
        if not room.any():
            break
        share[np.argmax(np.where(room, step * (quota - share), -np.inf))] += step  # the largest remainder
    return share


def _assign(x: np.ndarray, part: _Partition | None, probes: int, cfg: DedupConfig, gpu: bool,
            progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """(N, probes) int32 cell ids, most similar first, and their (N, probes) float16 similarities; also
    validates every row. ``part=None``: one cell, every pair compared."""
    index = _flat_index(part.centres, gpu) if part is not None else None
    n = x.shape[0]
    ids = np.empty((n, probes), np.int32)
    sims = np.empty((n, probes), np.float16)  # only ranks members for the cell bound: half the memory
    for s in _maybe_tqdm(range(0, n, cfg.batch_size), progress, "assign"):
        e = min(n, s + cfg.batch_size)
        v = _read_rows(x, slice(s, e), cfg.normalize, first_row=s)
        if index is None:
            sims[s:e], ids[s:e] = 1.0, 0
        else:
            sims[s:e], ids[s:e] = index.search(v, probes)
    return ids, sims


def _bound_cells(probe_ids: np.ndarray, probe_sims: np.ndarray, k: int, cap: int) -> tuple[np.ndarray, dict]:
    """Homes with at most ``cap`` vectors per cell, by deferred acceptance: every vector asks its probes in
    order, a full cell keeps the ``cap`` members most similar to its centre and turns the others to their
    next probe. Returns ``probe_ids`` with each vector's home swapped to column 0, in place (the set of probes
    is unchanged, so every pair is still searched from both ends), and the balancing stats. A vector turned away
    by all its probes stays in its last one: only more than ``probes * cap`` near-identical rows do that."""
    n, probes = probe_ids.shape
    rows = np.arange(n)
    rank = np.zeros(n, np.int64)
    rounds = 0
    while True:
        home = probe_ids[rows, rank]
        over = np.bincount(home, minlength=k) > cap
        members = np.flatnonzero(over[home] & (rank < probes - 1))
        if len(members) == 0:
            break
        sims = probe_sims[members, rank[members]].astype(np.float32)
        order = members[np.lexsort((-sims, home[members]))]  # by cell, most similar first
        h = home[order]
        turned = order[np.arange(len(order)) - np.searchsorted(h, h) >= cap]  # past the cap within the cell
        if len(turned) == 0:  # what is over the cap is held by vectors turned away by all their probes
            break
        rank[turned] += 1
        rounds += 1
    home = probe_ids[rows, rank]
    probe_ids[rows, rank] = probe_ids[:, 0]  # in place: (N, probes) is the largest array of the search
    probe_ids[:, 0] = home
    sizes = np.bincount(home, minlength=k)
    return probe_ids, {"cap": cap, "rounds": rounds, "moved": int((rank > 0).sum()),
                       "cells_over_cap": int((sizes > cap).sum())}


def _maybe_tqdm(it, progress: bool, desc: str):
    if not progress:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, leave=False)


def _csr(keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids grouped by key: ids[ptr[c]:ptr[c+1]] are the ids with key c, ascending. keys: (N, m) or (N,).
    Ids are int32 when N allows (the query lists hold N * clusters_per_vector of them)."""
    flat = keys.reshape(len(keys), -1)
    order = np.argsort(flat.ravel(), kind="stable")
    order //= flat.shape[1]  # row-major + stable sort keeps ids ascending within a key
    ids = order.astype(np.int32) if len(keys) < 2**31 else order  # N * probes ids: halve the memory
    ptr = np.zeros(k + 1, np.int64)
    np.cumsum(np.bincount(flat.ravel(), minlength=k), out=ptr[1:])
    return ids, ptr


def find_duplicates(embeddings: np.ndarray | str | Path, cfg: DedupConfig = DedupConfig(),
                    progress: bool = False) -> DedupResult:
    """Connected components of the graph "cosine >= cfg.threshold" over unit-norm (N, D) embeddings
    (array or ``.npy`` path, memory-mapped). See the module docstring for the method."""
    x = open_embeddings(embeddings)
    try:
        return _find_duplicates(x, cfg, progress)
    except EmbeddingsError as e:
        if isinstance(embeddings, (str, Path)):  # name the file, as open_embeddings does
            raise EmbeddingsError(f"{embeddings}: {e}") from None
        raise


def _find_duplicates(x: np.ndarray, cfg: DedupConfig, progress: bool) -> DedupResult:
    t_start = time.perf_counter()
    n, d = x.shape
    gpu = _resolve_gpu(cfg.use_gpu)
    thr = np.float32(cfg.threshold)
    timings = {}
    if n == 0:
        return DedupResult(np.zeros(0, np.int64), 0, 0, np.zeros(0, np.float32), {"n": 0, "dim": d})

    k = min(n, cfg.n_clusters or _default_clusters(n, cfg.clusters_per_vector))
    t = time.perf_counter()
    part = _train_partition(x, k, cfg, gpu) if k > 1 else None
    k = len(part.centres) if part else 1  # fewer than asked only for rows without enough distinct directions
    probes = min(k, cfg.clusters_per_vector)
    timings["kmeans_s"] = time.perf_counter() - t

    t = time.perf_counter()
    probe_ids, probe_sims = _assign(x, part, probes, cfg, gpu, progress)
    cap = cfg.max_cell_size or _default_cap(n, k)
    probe_ids, balance = _bound_cells(probe_ids, probe_sims, k, cap)
    del probe_sims
    home = probe_ids[:, 0]
    timings["assign_s"] = time.perf_counter() - t

    t = time.perf_counter()
    db_ids, db_ptr = _csr(home, k)
    q_ids, q_ptr = _csr(probe_ids, k)
    uf = _UnionFind(n)
    nn_sim = np.full(n, -1.0, np.float32)
    n_pairs = 0
    comparisons = 0
    for c in _maybe_tqdm(range(k), progress, "search"):
        db = db_ids[db_ptr[c]:db_ptr[c + 1]]
        if len(db) == 0:
            continue
        q = q_ids[q_ptr[c]:q_ptr[c + 1]]  # ascending; contains db (a vector probes its home first)
        xq = _read_rows(x, q, cfg.normalize, check=False)  # checked in _assign
        db_pos_in_q = np.searchsorted(q, db)
        xd = xq[db_pos_in_q]
        comparisons += len(q) * len(db)
        cols_per_block = max(1, BLOCK_ELEMS // len(db))
        db_best = np.full(len(db), -1.0, np.float32)
        for c0 in range(0, len(q), cols_per_block):
            c1 = min(len(q), c0 + cols_per_block)
            # (|db|, queries): column reductions vectorise well, and only the few columns holding a
            # duplicate are scanned for pairs (a full nonzero pass would cost more than the product).
            s = xd @ xq[c0:c1].T
            self_rows = np.flatnonzero((db_pos_in_q >= c0) & (db_pos_in_q < c1))
            s[self_rows, db_pos_in_q[self_rows] - c0] = -np.inf  # a vector is not its own neighbour
            qi = q[c0:c1]
            q_best = s.max(axis=0)
            nn_sim[qi] = np.maximum(nn_sim[qi], q_best)
            np.maximum(db_best, s.max(axis=1), out=db_best)
            hit_cols = np.flatnonzero(q_best >= thr)
            if len(hit_cols) == 0:
                continue
            rr, cc = np.nonzero(s[:, hit_cols] >= thr)
            a, b = qi[hit_cols[cc]], db[rr]  # query, database member
            uf.union(a, b)
            # Count each pair once: from its smaller end, unless that end never probes the other's home.
            larger = a > b
            seen_other_way = (probe_ids[b[larger]] == home[a[larger]][:, None]).any(axis=1)
            n_pairs += int((~larger).sum()) + int((~seen_other_way).sum())
        nn_sim[db] = np.maximum(nn_sim[db], db_best)
    timings["search_s"] = time.perf_counter() - t

    t = time.perf_counter()
    labels = uf.labels()
    sizes = np.bincount(labels, minlength=n)  # indexed by component id (= smallest member)
    n_components = int((sizes > 0).sum())
    timings["components_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start

    db_sizes = np.diff(db_ptr)
    comp_sizes = sizes[sizes > 0]
    stats = {
        "n": n, "dim": d, "n_clusters": k, "clusters_per_vector": probes,
        "coarse_clusters": part.coarse_clusters if part else 0, "train_points": part.train_points if part else 0,
        "gpu": gpu, "config": asdict(cfg),
        "cluster_size": {"min": int(db_sizes.min()), "median": float(np.median(db_sizes)),
                         "max": int(db_sizes.max()), "empty": int((db_sizes == 0).sum())},
        "cell_bound": balance,
        "comparisons": comparisons,
        "compared_fraction_of_all_pairs": comparisons / max(1, n * (n - 1)),
        "n_pairs": n_pairs, "n_components": n_components, "n_duplicates": n - n_components,
        "largest_component": int(comp_sizes.max()),
        "components_with_duplicates": int((comp_sizes > 1).sum()),
        "timings": timings,
    }
    return DedupResult(labels, n_components, n_pairs, nn_sim, stats)


# ------------------------------------------------------------------------------------------ reference


def exact_components(embeddings: np.ndarray, threshold: float) -> np.ndarray:
    """Brute-force reference: (N,) int64 labels (smallest member index) of the graph "x_i . x_j >= threshold"
    by a dense N x N product and depth-first search. For tests and small N only."""
    x = np.asarray(embeddings, dtype=np.float32)
    adj = (x @ x.T) >= np.float32(threshold)
    np.fill_diagonal(adj, False)
    labels = np.full(len(x), -1, np.int64)
    for root in range(len(x)):  # ascending, so the first node reached is the smallest member
        if labels[root] >= 0:
            continue
        labels[root] = root
        stack = [root]
        while stack:
            i = stack.pop()
            nbrs = np.flatnonzero(adj[i] & (labels < 0))
            labels[nbrs] = root
            stack.extend(nbrs.tolist())
    return labels


# ------------------------------------------------------------------------------------------ keepers


def choose_keepers(labels: np.ndarray, rule: str = "first", clip_scores: np.ndarray | None = None,
                   caption_lengths: np.ndarray | None = None) -> np.ndarray:
    """(N,) bool, exactly one True per component. ``first``: smallest index; ``clip``: highest CLIP score;
    ``longest_caption``: longest caption. Ties (and NaN scores, ranked last) go to the smallest index."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    n = len(labels)
    if rule == "first":
        score = np.zeros(n)
    elif rule in ("clip", "longest_caption"):
        name, arr = ("clip_scores", clip_scores) if rule == "clip" else ("caption_lengths", caption_lengths)
        if arr is None:
            raise ValueError(f"keep rule {rule!r} needs {name}")
        arr = np.asarray(arr)
        if arr.shape != (n,) or not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"{name} must be a numeric array of shape ({n},) like labels, got shape {arr.shape} "
                             f"dtype {arr.dtype}")
        score = np.where(np.isnan(arr.astype(np.float64)), -np.inf, arr.astype(np.float64))
    else:
        raise ValueError(f"unknown keep rule {rule!r}; expected one of {KEEP_RULES}")
    order = np.lexsort((np.arange(n), -score, labels))  # by label, then best score, then index
    first = np.ones(n, bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    keep = np.zeros(n, bool)
    keep[order[first]] = True
    return keep
