"""What the learning roads share (scripts/learning_image.py, scripts/learning_speech.py): running one entry point's
``main(argv)`` as a timed stage, and exporting the model a run starts from (the untrained baseline)."""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


class RoadError(RuntimeError):
    """A stage of the road that failed; the message names its command and exit status."""


@dataclass(frozen=True)
class Stage:
    seconds: float
    summary: dict | None  # the command's JSON summary (last stdout line), None when it prints none


def run_stage(module: str, main: Callable[[list[str]], int], argv: list[str]) -> Stage:
    """``python -m scripts.<module> *argv`` in this process; its stdout is kept for its JSON summary."""
    out = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(out):
        status = main(argv)
    if status != 0:
        raise RoadError(f"python -m scripts.{module} {' '.join(argv)} exited with status {status} (its "
                        "message is on stderr above)")
    lines = out.getvalue().strip().splitlines()
    return Stage(time.perf_counter() - t, json.loads(lines[-1]) if lines else None)


def export_untrained(config: Path, overrides: list[str], out: Path) -> Path:
    """The model a run of ``config`` starts from, written by its kind's exporter: the no-audio baseline."""
    from training.config import load_run_config
    from training.spec import get_spec
    from training.trainer import load_tokenizer

    cfg = load_run_config(config, overrides)
    spec = get_spec(cfg.kind)
    model = spec.build_model(cfg, load_tokenizer(cfg))
    return spec.export(model.float().eval(), cfg, out)
