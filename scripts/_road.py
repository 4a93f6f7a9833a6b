"""What the learning roads share (scripts/learning_{image,video,speech}.py, run by scripts.bench_learning):
running one entry point's ``main(argv)`` as a timed stage, and exporting the model a run starts from (the
untrained baseline)."""

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
    summary: dict | None  # the command's JSON summary (last stdout line), None when that is not JSON


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
    try:
        summary = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:  # a command that ends with a line of text (scripts.evaluate), not JSON
        summary = None
    return Stage(time.perf_counter() - t, summary)


def export_untrained(config: Path, overrides: list[str], out: Path) -> Path:
    """The model a run of ``config`` starts from, written by its kind's exporter: the no-audio baseline."""
    from training.config import load_run_config
    from training.spec import get_spec
    from training.trainer import load_tokenizer

    cfg = load_run_config(config, overrides)
    spec = get_spec(cfg.kind)
    model = spec.build_model(cfg, load_tokenizer(cfg))
    return spec.export(model.float().eval(), cfg, out)


# The run-config keys that hold paths: a road roots each under its work dir.
PATH_KEYS = ("model.tokenizer", "model.lm", "model.encoder_from", "model.init_from", "data.shards", "train.run_dir")


def rooted_overrides(config: Path, work: Path, seed: int, progress: bool) -> list[str]:
    """``--set`` values putting every path of ``config`` under ``work``, plus the seed and the progress bar."""
    import yaml

    cfg = yaml.safe_load(config.read_text())
    sets = []
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = (cfg.get(section) or {}).get(name)
        if value:  # data.shards may list several globs, separated by spaces
            sets.append(f"{key}={' '.join(str(work / v) for v in str(value).split())}")
    return sets + [f"model.seed={seed}", f"data.seed={seed}", f"train.progress={str(progress).lower()}"]


def set_args(overrides: list[str]) -> list[str]:
    """``["a=1", "b=2"]`` -> ``["--set", "a=1", "--set", "b=2"]``: the training scripts' override flags."""
    return [arg for o in overrides for arg in ("--set", o)]


def train_stage(config: Path, work: Path, seed: int, progress: bool) -> Stage:
    """``python -m scripts.train --config CONFIG`` with its paths rooted at ``work``."""
    from scripts import train

    return run_stage("train", train.main, ["--config", str(config), *set_args(rooted_overrides(config, work, seed,
                                                                                               progress))])


def offline_curation(config: Path, out: Path) -> Path:
    """``config`` (an image curation YAML) with the dedup stage off, written to ``out``.

    Dedup names the official SSCD TorchScript file, not available offline, and random SSCD weights can only
    tell exact copies (which the renderers never make: every scene has its own tint and positions) at ~0.06 s
    a scene on 2 cores, more than the rest of a road's curation together. tests/synthetic/test_curation.py
    runs the stage on the shapes task with a tiny SSCD and a planted copy."""
    import yaml

    cfg = yaml.safe_load(config.read_text())
    cfg["dedup"] = {"enabled": False}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def shown_path(path: str | Path) -> str:
    """``path`` as a summary prints it: relative to the current directory when under it (``make demo``)."""
    p, here = Path(path), Path.cwd()
    return str(p.relative_to(here)) if p.is_relative_to(here) else str(p)
