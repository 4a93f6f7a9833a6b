"""Reference helpers written from Hugging Face's code, independent of our converters.

transformers is a dev dependency pinned to 4.54.x (the release's semantics): tests import it directly
and fail, rather than skip, when it is missing or another version is installed.
"""

import torch
import transformers
from transformers.models.mllama.image_processing_mllama import get_all_supported_aspect_ratios

assert transformers.__version__.startswith("4.54"), (
    f"transformers {transformers.__version__}: the parity tests need 4.54.x (4.55+ changed the vision taps)"
)


def precompute_tile_table(grid: torch.Tensor) -> torch.Tensor:
    """Meta's [T, T, N, D] tile grid -> HF's per-aspect-ratio rows (HF converter's
    ``pre_compute_positional_embedding``): row i+1 holds grid[:h, :w] for ratio i; row 0 (padding) is zero."""
    T, _, N, D = grid.shape
    ratios = get_all_supported_aspect_ratios(T)
    table = torch.zeros(len(ratios) + 1, T, N, D)
    for i, (h, w) in enumerate(ratios):
        table[i + 1, : h * w] = grid[:h, :w].reshape(h * w, N, D)
    return table.flatten(1)
