"""The decoding roofline of scripts/bench_model.py counts the weights a decoding step really reads: checked
against the parameters whose storage every aten op of one cached decoding step receives (a dispatch trace)."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from adapters.generation import SamplingConfig, generate
from adapters.multimodal import ImageBatch
from scripts.bench_model import _decode_weight_names, memory_bandwidth, decode_step_bytes
from tests.tiny import build_tiny_tokenizer, build_tiny_vqa_model
from vision.tiling import TilingConfig, collate_tiled, tile_image


class _Seen(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ptrs: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for a in torch.utils._pytree.tree_leaves((args, kwargs or {})):
            if isinstance(a, torch.Tensor):
                self.ptrs.add(a.untyped_storage().data_ptr())
        return func(*args, **(kwargs or {}))


def test_decode_bytes_are_the_parameters_one_step_reads(tmp_path):
    from PIL import Image

    tok = build_tiny_tokenizer(tmp_path)
    model = build_tiny_vqa_model(tok).eval()
    with torch.no_grad():
        for p in model.cross_attention_layers.parameters():
            if p.numel() == 1:
                p.fill_(0.5)  # gates open: the blocks' weights are read for real
    v = model.cfg.vision
    img = tile_image(Image.new("RGB", (40, 30), (200, 10, 10)), TilingConfig(tile_size=v.tile_size, max_tiles=v.max_tiles))
    images = ImageBatch.from_collated(collate_tiled([[img]]))
    prompt = torch.tensor([[tok.bos_id, model.cfg.lm.vocab_size, 5, 6, 7]])
    steps = generate(model, prompt, images, SamplingConfig(max_new_tokens=3))
    next(steps)  # prefill and the first token, outside the trace
    seen = _Seen()
    with seen:
        next(steps)  # one cached decoding step
    read = {n for n, p in model.named_parameters() if p.untyped_storage().data_ptr() in seen.ptrs}
    counted = set(_decode_weight_names(model))
    assert read - {"lm.tok_embeddings.weight"} == counted  # the table is read one row per batch row
    assert not [n for n in read if n.startswith(("vision.", "projector.", "learnable_embedding."))
                or n.startswith("cross_attention_layers.") and n.endswith(("wk.weight", "wv.weight"))]
    nbytes = decode_step_bytes(model, batch=1, prompt_len=5, new_tokens=3, vision_tokens=10)
    params = dict(model.named_parameters())
    assert nbytes["weights"] == sum(params[n].numel() * 4 for n in counted) + model.cfg.lm.dim * 4
    assert nbytes["total"] == nbytes["weights"] + nbytes["kv_cache_mean"] + nbytes["vision_kv"]


def test_memory_bandwidth_is_measured():
    bw = memory_bandwidth(nbytes=8 << 20, repeats=2)
    assert bw["bytes_per_s"] > 0 and bw["copy_gb_per_s"] > 0 and bw["buffer_mib"] == 8
