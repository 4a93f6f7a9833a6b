"""One rank of the combined-layout tests (tests/training/test_layouts.py): `training.trainer.train` on a run
config of dotted overrides, launched with RANK / WORLD_SIZE / MASTER_* set; rank 0 writes ``losses.json``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--ds", required=True, help="DeepSpeed config JSON file")
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE of the run config")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import torch.distributed as dist  # noqa: PLC0415

    from training.config import load_run_config  # noqa: PLC0415
    from training.trainer import train  # noqa: PLC0415

    result = train(load_run_config(None, args.overrides), json.loads(Path(args.ds).read_text()))
    if dist.get_rank() == 0:
        (Path(args.out) / "losses.json").write_text(json.dumps({str(k): v for k, v in result.losses.items()}))


if __name__ == "__main__":
    main()
