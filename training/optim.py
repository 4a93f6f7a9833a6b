"""The one learning-rate schedule of training/: linear warmup, then cosine decay to a floor.

The trainer (`training.trainer.train`, every kind, pipeline mode included) hands `warmup_cosine` to
``torch.optim.lr_scheduler.LambdaLR``, so a run's LR curve depends only on its config.
"""

from __future__ import annotations

import math
from collections.abc import Callable


def warmup_cosine(warmup: int, steps: int, min_ratio: float = 0.0) -> Callable[[int], float]:
    """LR multiplier: linear warmup over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``steps``."""

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return fn
