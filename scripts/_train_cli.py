"""The command line the training scripts share: ``--config RUN.yaml [--deepspeed DS.json] [--set key=value ...]``.

Launch alone (one CPU/GPU process, no launcher needed), or with ``torchrun --nproc_per_node N -m
scripts.train_image_adapter ...`` / ``deepspeed --module scripts.train_image_adapter ...``. Exit code 2: a
config, DeepSpeed config, tokenizer, checkpoint or shard error, a resume the checkpoint cannot honour or
refused rank state, a non-finite loss (the message names it).
"""

from __future__ import annotations

import argparse
import json
import sys


def train_main(argv: list[str] | None, *, doc: str, name: str, kind: str | None) -> int:
    """``kind`` None: any kind the config names (`scripts.train`); else the config must name ``kind``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="run config YAML (configs/train/*.yaml, configs/run_*.yaml)")
    p.add_argument("--deepspeed", default=None, help="DeepSpeed JSON (overrides the config's 'deepspeed')")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, repeatable: --set train.steps=10 --set data.shards='x/{0..3}.tar'")
    p.add_argument("--parallel", choices=("data", "pipeline"), default=None,
                   help="override the config's 'parallel'")
    # the deepspeed launcher passes --local_rank; the rank itself comes from the environment
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    from adapters.checkpoint import CheckpointError
    from adapters.tokenizer import TokenizerError
    from media.tar import ShardError
    from training.config import TrainConfigError, load_run_config
    from training.data import BadSampleError
    from training.trainer import TrainError, train

    overrides = list(args.set) + ([f"deepspeed={args.deepspeed}"] if args.deepspeed else [])
    overrides += [f"parallel={args.parallel}"] if args.parallel else []
    try:
        cfg = load_run_config(args.config, overrides)
        if kind is not None and cfg.kind != kind:
            raise TrainConfigError(f"{args.config}: kind {cfg.kind!r}, but {name} trains {kind!r}")
        result = train(cfg)
    except (TrainConfigError, ShardError, BadSampleError, TokenizerError, CheckpointError, TrainError) as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 2
    last = max(result.losses) if result.losses else None
    summary = {"run_dir": str(result.run_dir), "export": str(result.export_dir) if result.export_dir else None,
               "last_step": last, "last_loss": result.losses.get(last) if last else None,
               "steps_per_s": result.steps_per_s, "tokens_per_s": result.tokens_per_s,
               "bad_samples": result.bad_samples}
    if result.sources is not None:  # a data mix: each source's weight, samples delivered and realised share
        summary["sources"] = result.sources
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(json.dumps(summary))
    return 0
