"""De-duplicate images by their SSCD descriptors: connected components of "cosine >= threshold", one kept each.

    python -m scripts.dedup EMBEDDINGS.npy [--threshold 0.75] [--out DIR] [--clusters N]
        [--clusters-per-vector K] [--max-cell-size M] [--keep first|clip|longest_caption --scores SCORES.npy]
        [--normalize] [--json]

EMBEDDINGS.npy is (N, D) float16/32, L2-normalised, row i = sample i (read memory-mapped). Writes to DIR
(default: EMBEDDINGS_dedup/ next to the input) ``components.npy`` (N,) int64 component id = smallest member
index, ``keep.npy`` (N,) bool, ``nn_similarity.npy`` (N,) float32 and ``dedup_stats.json`` (written last).
``--scores`` is an (N,) array: CLIP scores for ``--keep clip``, caption lengths for ``--keep longest_caption``.
Exit code 2 on bad input, with a message naming the file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from data_curation.dedup import (KEEP_RULES, DedupConfig, EmbeddingsError, choose_keepers, find_duplicates,
                                 open_embeddings)
from data_curation.engine import ClusterError


def _load_scores(path: str, n: int) -> np.ndarray:
    p = Path(path)
    if not p.is_file():
        raise EmbeddingsError(f"{p}: scores file not found")
    try:
        scores = np.load(p, allow_pickle=False)
    except Exception as e:
        raise EmbeddingsError(f"{p}: not a readable .npy array ({type(e).__name__}: {e})") from e
    if scores.shape != (n,) or not np.issubdtype(scores.dtype, np.number):
        raise EmbeddingsError(f"{p}: expected ({n},) numeric scores (one per embedding), got shape {scores.shape} "
                              f"dtype {scores.dtype}")
    return scores


def _save(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("embeddings", help="(N, D) .npy of L2-normalised SSCD descriptors")
    p.add_argument("--threshold", type=float, default=DedupConfig.threshold, help="cosine; pairs >= it are duplicates")
    p.add_argument("--out", default=None, help="output folder (default: <embeddings stem>_dedup next to the input)")
    p.add_argument("--clusters", type=int, default=None, help="k-means clusters (default: sqrt(K * N), 1 if N is small)")
    p.add_argument("--clusters-per-vector", type=int, default=DedupConfig.clusters_per_vector,
                   help="clusters each vector is searched in (IVF nprobe)")
    p.add_argument("--max-cell-size", type=int, default=None,
                   help="vectors stored per cluster (default: 4x the mean, N / clusters)")
    p.add_argument("--keep", default="first", choices=KEEP_RULES, help="which member of a component to keep")
    p.add_argument("--scores", default=None, help="(N,) .npy: CLIP scores (--keep clip) or caption lengths")
    p.add_argument("--normalize", action="store_true", help="L2-normalise rows instead of rejecting them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="Ray tasks at a time (the local instance's CPUs)")
    p.add_argument("--address", default=None,
                   help="a Ray cluster to run on ('auto', host:port, ray://host:port); left out, Ray starts here")
    p.add_argument("--json", action="store_true", help="print the JSON summary only")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    try:
        cfg = DedupConfig(threshold=args.threshold, n_clusters=args.clusters,
                          clusters_per_vector=args.clusters_per_vector, max_cell_size=args.max_cell_size,
                          seed=args.seed, normalize=args.normalize)
        if args.keep != "first" and args.scores is None:
            raise ValueError(f"--keep {args.keep} needs --scores")
        n = open_embeddings(args.embeddings).shape[0]  # check the inputs before the long part
        scores = _load_scores(args.scores, n) if args.keep != "first" else None
        res = find_duplicates(args.embeddings, cfg, progress=not args.json, address=args.address,
                              workers=args.workers)
        keep = choose_keepers(res.labels, args.keep, clip_scores=scores if args.keep == "clip" else None,
                              caption_lengths=scores if args.keep == "longest_caption" else None)
    except (ValueError, ClusterError) as e:  # EmbeddingsError included; its message names the file
        print(f"error: {e}", file=sys.stderr)
        return 2

    src = Path(args.embeddings)
    out = Path(args.out) if args.out else src.with_name(src.stem + "_dedup")
    out.mkdir(parents=True, exist_ok=True)
    (out / "dedup_stats.json").unlink(missing_ok=True)  # a rerun is complete only once it is rewritten
    _save(out / "components.npy", res.labels)
    _save(out / "keep.npy", keep)
    _save(out / "nn_similarity.npy", res.nn_similarity)
    summary = {
        "embeddings": str(src), "out": str(out), "n": n, "n_components": res.n_components,
        "n_duplicates_removed": int(n - keep.sum()), "n_pairs": res.n_pairs, "threshold": cfg.threshold,
        "keep_rule": args.keep, "seconds": time.perf_counter() - t0,
    }
    stats = {**summary, "dedup": res.stats}
    tmp = out / "dedup_stats.json.tmp"
    tmp.write_text(json.dumps(stats, indent=2))
    os.replace(tmp, out / "dedup_stats.json")  # last: marks the folder complete
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{src}: {n} vectors, {res.n_components} components, {summary['n_duplicates_removed']} duplicates "
          f"removed ({res.n_pairs} pairs >= {cfg.threshold}), keep={args.keep}, {summary['seconds']:.1f} s")
    print(f"wrote {out}/components.npy, keep.npy, nn_similarity.npy, dedup_stats.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
