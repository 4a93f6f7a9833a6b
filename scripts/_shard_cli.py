"""The command line the shard builders share (``scripts.build_shards``, ``build_video_shards``,
``build_audio_shards``): ``INPUT OUT [--config FILE] [--workers N] [--max-sample-bytes N] [--allow-outside-root]
[--address A] [--json]``; a summary on stderr and the report JSON on stdout; exit code 2, with one line naming the problem,
on a config, input or stage setup error, an unreachable Ray cluster, a resume that does not match what OUT holds, or OUT in use by
another live build."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from data_curation.curation_config import ConfigError
from data_curation.input_files import CurationInputError


def shard_main(argv: list[str] | None, *, doc: str, name: str, config_help: str,
               builder: Callable[[], tuple[Callable, Callable]],
               kept_detail: Callable[[dict], str] = lambda report: "") -> int:
    """Parse ``argv``, then ``load_config, build = builder()`` (imported only now, so ``--help`` and argument
    errors stay fast) and run ``build(INPUT, OUT, load_config(FILE, overrides), progress=...)``.
    ``kept_detail(report)`` is appended to the kept count in the summary."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input")
    p.add_argument("out")
    p.add_argument("--config", default=None, help=config_help)
    p.add_argument("--workers", type=int, default=None, help="override the config's worker count")
    p.add_argument("--max-sample-bytes", type=int, default=None,
                   help="override the config's cap on the bytes one sample may read (larger inputs are errors)")
    p.add_argument("--allow-outside-root", action="store_true", default=None,
                   help="let manifest rows and folder symlinks name files outside the input's folder")
    p.add_argument("--address", default=None,
                   help="a Ray cluster to run on: 'auto' (the one `ray start` made on this node), a head's "
                        "host:port or ray://host:port; left out, a Ray instance starts inside this process")
    p.add_argument("--json", action="store_true", help="print only the report JSON")
    args = p.parse_args(argv)
    from data_curation.engine import ClusterError
    from data_curation.shard_jobs import OutputBusyError, ResumeMismatchError, StageSetupError

    load_config, build = builder()
    overrides = {k: v for k, v in (("workers", args.workers), ("max_sample_bytes", args.max_sample_bytes),
                                   ("allow_outside_root", args.allow_outside_root)) if v is not None}
    try:
        cfg = load_config(args.config, overrides)
        result = build(args.input, args.out, cfg, progress=not args.json, address=args.address)
    except (ConfigError, CurationInputError, StageSetupError, ResumeMismatchError, OutputBusyError, ClusterError,
            FileNotFoundError) as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 2
    r = result.report
    if not args.json:
        print(f"{r['inputs']} inputs -> {r['counts']['kept']} kept{kept_detail(r)}, {r['counts']['dropped']} "
              f"dropped, {r['counts']['error']} errors in {r['shards']} shards under {result.out}", file=sys.stderr)
        for key, n in r["by_reason"].items():
            print(f"  {key}: {n}", file=sys.stderr)
    print(json.dumps(r, indent=None if args.json else 2))
    return 0
