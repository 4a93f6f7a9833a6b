"""Near-duplicate image removal over SSCD descriptors (Llama 3 sec. 7.1): every pair with cosine similarity
>= threshold is an edge, connected components of that graph are duplicate groups, one image-text pair is
kept per component.

Search (never materialises N x N; embeddings may be a memory-mapped ``.npy`` larger than RAM). The driver
trains the cells and does the bookkeeping on (N, probes) int arrays; the passes over the rows are Ray tasks
(``engine.connect(address, workers)``: a Ray instance started in this process, or a cluster). Tasks read rows
from the ``.npy`` by path (each maps the file itself: rows never go through the object store) or, for an
in-memory array, from one copy put in the object store:

1. Driver: cells, trained on a random sample of the descriptors (``_train_partition``): spherical k-means
   (``faiss.Kmeans(spherical=True)``) into ``sqrt(k)`` *coarse* cells, then every coarse cell split into
   cells in proportion to its share of the sample by spherical k-means on its members' *residuals*
   (``_cell_centres``). The centres go to the object store once.
2. Tasks, one per ``batch_size`` rows (``_assign_rows``): each vector's ``clusters_per_vector`` most similar
   cell centres (its *probes*, faiss flat inner product), checking the rows are unit-norm.
3. Driver: cell bound. Each vector's *home* is its first probe, unless that cell already holds
   ``max_cell_size`` vectors more similar to its centre; then its next probe (deferred acceptance,
   ``_bound_cells``). The probe lists grouped by cell (CSR) go to the object store once, read zero-copy.
4. Tasks, each a run of cells of about equal cost, ``TASKS_PER_SLOT`` per CPU of the Ray instance
   (``_search_cells``): for every cell c, the vectors that probe c are compared exactly (float32 matrix
   products, in blocks of bounded size) with the vectors whose home is c. A pair (i, j) is found when
   ``home(j)`` is among i's probes or ``home(i)`` among j's: IVF search with nprobe = ``clusters_per_vector``,
   run symmetrically. This is asymmetric on purpose: assigning *both* sides to their top-k clusters finds a
   few more pairs but costs k^2 instead of k comparisons per pair (measured on 100k uniform 512-d vectors:
   top-3 on both sides, 0.9% of all pairs compared, recall 0.988; probing 8 clusters, 0.8% compared,
   recall 0.996). A task returns its pair count, comparisons, the best similarity of each vector it
   compared, and its pairs reduced to a forest by a local union-find (at most one edge per vector).
5. Driver: global union-find over the tasks' forests (vectorised numpy, hooking the larger root under the
   smaller), so components that span cells and tasks are joined; the component id is its smallest member
   index.

Every task computes exactly what the single loop did for its rows or cells (assignment batches start at the
same rows), so the result does not depend on the number of workers or tasks.

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

Measured figures: ``data_curation/bench_dedup.py``. As Ray tasks on 2 shared cores (``workers=2``), the 1M
memory-mapped uniform set took 140 s (k-means 4, assignment 101, search 34) where the single-process loops
took 273 s on the same machine, with the same pairs and components; starting the local Ray instance costs
4-15 s once per process (``stats["timings"]["ray_setup_s"]``).
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
# Search tasks per CPU of the Ray instance: evens out groups of cells of unequal cost, while the per-task
# overhead (a union-find and a best-similarity array over N) stays small.
TASKS_PER_SLOT = 4


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
    batch_size: int = 16384  # rows per assignment task: 7 tasks at 100k, 62 at 1M, to keep every worker busy
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


def _assign_rows(rows, centres: np.ndarray | None, start: int, stop: int, probes: int, normalize: bool,
                 gpu: bool) -> tuple[np.ndarray, np.ndarray]:
    """Ray task, one batch of the assignment pass: rows ``start:stop`` (checked) -> their (B, probes) int32
    cell ids, most similar first, and (B, probes) float16 similarities. ``rows``: the ``.npy`` path, opened
    here memory-mapped, or the array itself (``_rows_source``); ``centres=None``: one cell."""
    x = _open_rows(rows)
    v = _read_rows(x, slice(start, stop), normalize, first_row=start)
    if centres is None:
        return np.zeros((len(v), probes), np.int32), np.ones((len(v), probes), np.float16)
    sims, ids = _flat_index(centres, gpu).search(v, probes)
    return ids.astype(np.int32), sims.astype(np.float16)  # float16: only ranks members for the cell bound


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


def _search_cells(rows, lists: tuple, cells: np.ndarray, threshold: float, normalize: bool) -> tuple:
    """Ray task, step 4 for a group of cells. ``lists`` = (probe_ids with each home in column 0, db_ids,
    db_ptr, q_ids, q_ptr), read zero-copy from the object store. For every cell c the vectors that probe c
    (ascending) are compared with the vectors whose home is c, in float32 blocks of at most ``BLOCK_ELEMS``.
    Returns the components of the pairs found as a forest (vertex, smallest vertex of its local component:
    at most one edge per vector, however many pairs), the number of distinct pairs, the comparisons made,
    and each compared vector's best similarity (vector ids, values)."""
    probe_ids, db_ids, db_ptr, q_ids, q_ptr = lists
    x = _open_rows(rows)
    n = len(probe_ids)
    home = probe_ids[:, 0]
    thr = np.float32(threshold)
    uf = _UnionFind(n)
    best = np.full(n, -1.0, np.float32)
    n_pairs = comparisons = 0
    for c in cells:
        db = db_ids[db_ptr[c]:db_ptr[c + 1]]
        q = q_ids[q_ptr[c]:q_ptr[c + 1]]  # ascending; contains db (a vector probes its home first)
        xq = _read_rows(x, q, normalize, check=False)  # checked by the assignment pass
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
            best[qi] = np.maximum(best[qi], q_best)
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
        best[db] = np.maximum(best[db], db_best)
    labels = uf.labels()
    linked = np.flatnonzero(labels != np.arange(n))
    touched = np.flatnonzero(best > -1.0)
    return linked, labels[linked], n_pairs, comparisons, touched, best[touched]


def _cell_groups(db_ptr: np.ndarray, q_ptr: np.ndarray, n_groups: int) -> list[np.ndarray]:
    """The non-empty cells in at most ``n_groups`` runs of about equal cost (|queries| x |members| each)."""
    cells = np.flatnonzero(np.diff(db_ptr) > 0)
    cum = np.cumsum(np.diff(q_ptr)[cells] * np.diff(db_ptr)[cells])
    bounds = np.searchsorted(cum, cum[-1] * np.arange(1, n_groups) / n_groups, side="right")
    return [g for g in np.split(cells, bounds) if len(g)]


# ------------------------------------------------------------------------------------------ Ray


def _ray():
    import ray

    return ray


def _rows_source(embeddings: np.ndarray | str | Path, x: np.ndarray):
    """What the tasks read rows from: the ``.npy`` path (each task maps the file itself: the rows never go
    through the object store), or an in-memory array put in the object store once (read zero-copy on its
    node)."""
    return str(Path(embeddings).resolve()) if isinstance(embeddings, (str, Path)) else _ray().put(x)


def _open_rows(rows) -> np.ndarray:
    return np.load(rows, mmap_mode="r") if isinstance(rows, str) else rows


def _gather(refs: list, progress: bool, desc: str) -> list:
    """The tasks' results in order; a task's ``EmbeddingsError`` (a bad row) is raised as itself."""
    ray = _ray()
    try:
        if progress:
            from tqdm import tqdm

            pending = list(refs)
            with tqdm(total=len(refs), desc=desc, leave=False) as bar:
                while pending:
                    done, pending = ray.wait(pending, num_returns=1)
                    bar.update(len(done))
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        # The other tasks are left to finish, not cancelled: ray.cancel racing a task's completion aborts the
        # driver in Ray 2.60 ("Tried to complete task that was not pending", the suite's dedup CLI test).
        if isinstance(e.cause, EmbeddingsError):
            raise e.cause from None
        raise


def find_duplicates(embeddings: np.ndarray | str | Path, cfg: DedupConfig = DedupConfig(),
                    progress: bool = False, address: str | None = None, workers: int = 2) -> DedupResult:
    """Connected components of the graph "cosine >= cfg.threshold" over unit-norm (N, D) embeddings
    (array or ``.npy`` path, memory-mapped). See the module docstring for the method. The assignment and
    the search run as Ray tasks (``engine.connect(address, workers)``: a local instance with at least
    ``workers`` CPUs, or a cluster, whose nodes must then see a path at the same place); the result does not
    depend on ``workers``."""
    x = open_embeddings(embeddings)
    try:
        return _find_duplicates(x, embeddings, cfg, progress, address, workers)
    except EmbeddingsError as e:
        if isinstance(embeddings, (str, Path)):  # name the file, as open_embeddings does
            raise EmbeddingsError(f"{embeddings}: {e}") from None
        raise


def _find_duplicates(x: np.ndarray, embeddings: np.ndarray | str | Path, cfg: DedupConfig, progress: bool,
                     address: str | None, workers: int) -> DedupResult:
    t_start = time.perf_counter()
    n, d = x.shape
    gpu = _resolve_gpu(cfg.use_gpu)
    timings = {}
    if n == 0:
        return DedupResult(np.zeros(0, np.int64), 0, 0, np.zeros(0, np.float32), {"n": 0, "dim": d})
    from data_curation.engine import connect

    t = time.perf_counter()
    connect(address, workers)  # seconds the first time in a process, then reused
    ray = _ray()
    slots = max(workers, int(ray.cluster_resources().get("CPU", 0)))
    rows = _rows_source(embeddings, x)
    timings["ray_setup_s"] = time.perf_counter() - t

    k = min(n, cfg.n_clusters or _default_clusters(n, cfg.clusters_per_vector))
    t = time.perf_counter()
    part = _train_partition(x, k, cfg, gpu) if k > 1 else None
    k = len(part.centres) if part else 1  # fewer than asked only for rows without enough distinct directions
    probes = min(k, cfg.clusters_per_vector)
    timings["kmeans_s"] = time.perf_counter() - t

    t = time.perf_counter()
    centres = ray.put(part.centres) if part is not None else None
    assign = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0, max_retries=0)(_assign_rows)
    refs = [assign.remote(rows, centres, s, min(n, s + cfg.batch_size), probes, cfg.normalize, gpu)
            for s in range(0, n, cfg.batch_size)]
    tasks = {"cpus": slots, "assign": len(refs)}
    batches = _gather(refs, progress, "assign")
    probe_ids = np.concatenate([ids for ids, _ in batches])
    probe_sims = np.concatenate([sims for _, sims in batches])
    del batches, refs, centres
    cap = cfg.max_cell_size or _default_cap(n, k)
    probe_ids, balance = _bound_cells(probe_ids, probe_sims, k, cap)
    del probe_sims
    timings["assign_s"] = time.perf_counter() - t

    t = time.perf_counter()
    db_ids, db_ptr = _csr(probe_ids[:, 0], k)
    q_ids, q_ptr = _csr(probe_ids, k)
    lists = ray.put((probe_ids, db_ids, db_ptr, q_ids, q_ptr))
    del probe_ids, db_ids, q_ids  # the tasks read the object store's copy
    search = ray.remote(num_cpus=1, max_retries=0)(_search_cells)
    refs = [search.remote(rows, lists, cells, cfg.threshold, cfg.normalize)
            for cells in _cell_groups(db_ptr, q_ptr, TASKS_PER_SLOT * slots)]
    tasks["search"] = len(refs)
    uf = _UnionFind(n)
    nn_sim = np.full(n, -1.0, np.float32)
    n_pairs = comparisons = 0
    for linked, root, pairs, compared, touched, best in _gather(refs, progress, "search"):
        uf.union(linked, root)
        nn_sim[touched] = np.maximum(nn_sim[touched], best)
        n_pairs += pairs
        comparisons += compared
    del refs, lists, rows
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
        "ray_tasks": tasks, "timings": timings,
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
