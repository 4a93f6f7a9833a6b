"""Meta's Llama 3.2 Vision layout: ``params.json`` + ``consolidated[.NN].pth`` model-parallel shards.

The vision hyper-parameters are code constants in Meta's release (ViT-H/14, 32 + 8 layers, taps
3,7,15,23,30), not in params.json, so loading takes an optional ``VisionEncoderConfig``. Key mapping and
strict loading are shared with the HF loader (``adapters.mllama``); shards merge along Meta's
model-parallel dimensions and split back the same way when saving.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from adapters.checkpoint import CheckpointError, config_from_meta_params, load_meta_shards, meta_ffn_dim, read_json
from adapters.mllama import _BLOCK_RE, _build, _few, _From, _VisionNames, _xattn_every
from adapters.multimodal import MultimodalConfig, MultimodalLlama
from vision import encoder as vision_encoder
from vision.encoder import VisionEncoderConfig

_META_VISION = "vision_model.vision_encoder."
_META_QKV = ("attn.wq.weight", "attn.wk.weight", "attn.wv.weight")
# Our vision names are Meta's (open_clip = OpenAI CLIP naming) except the packed attention and conv1.
_META_VISION_NAMES = _VisionNames(
    prefix=_META_VISION, block="{stack}.resblocks.{i}.", qkv=_META_QKV, wo="attn.wo.weight",
    names={}, block_names={},
)

# Model-parallel split of each Meta key (HF converter's is_param_different_across_shards/get_concat_dim):
# row-parallel weights along their inputs (dim 1); column-parallel weights and biases, the vocabulary
# and the patch embedding along dim 0; everything else (norms, gates, position tables, c_proj.bias,
# class embedding) is replicated.
_META_DIM1 = re.compile(r"(attention\.wo|feed_forward\.w2|attn\.wo|mlp\.c_proj)\.weight$")
_META_DIM0 = re.compile(
    r"((attention\.w[qkv]|feed_forward\.w[13]|attn\.w[qkv])\.weight"
    r"|mlp\.c_fc\.(weight|bias)|conv1\._linear\.weight|vision_projection\.(weight|bias)"
    r"|(^|\.)(tok_embeddings|learnable_embedding|output)\.weight)$"
)


def meta_vision_shard_dim(key: str) -> int | None:
    if _META_DIM1.search(key):
        return 1
    if _META_DIM0.search(key):
        return 0
    return None


def _meta_rule(key: str, shape: tuple[int, ...]) -> _From:
    if key.startswith("lm."):
        return _From(("text_model." + key.removeprefix("lm."),))
    if key.startswith(("learnable_embedding.", "cross_attention_layers.")):
        return _From(("text_model." + key,))
    if key.startswith("projector."):
        return _From(("vision_model.vision_projection." + key.removeprefix("projector."),))
    if key == "vision.conv1.weight":  # Meta: unfold + linear, (W, 3*p*p) with channel slowest
        return _From((_META_VISION + "conv1._linear.weight",), lambda parts: parts[0].reshape(shape))
    if key.startswith("vision."):
        return _META_VISION_NAMES.rule(key.removeprefix("vision."), shape)
    raise KeyError(f"no Meta source for our parameter {key!r}")  # converter out of date


def _to_meta(key: str, value: Tensor) -> dict[str, Tensor]:
    """One of our parameters -> Meta key(s); the inverse of ``_meta_rule``."""
    if key.startswith("vision."):
        vkey = key.removeprefix("vision.")
        m = _BLOCK_RE.match(vkey)
        if key == "vision.conv1.weight":
            return {_META_VISION + "conv1._linear.weight": value.flatten(1)}
        if m is not None and m.group(3) in ("attn.in_proj_bias", "attn.out_proj.bias"):  # attn_bias=True only
            if value.any():
                raise CheckpointError(f"{key}: non-zero attention bias; Meta's layout has none (train with "
                                      f"vision.attn_bias: false)")
            return {}
        if m is not None:
            blk = f"{_META_VISION}{m.group(1)}.resblocks.{m.group(2)}."
            if m.group(3) == "attn.in_proj_weight":
                return {blk + name: part for name, part in zip(_META_QKV, value.chunk(3, dim=0))}
            if m.group(3) == "attn.out_proj.weight":
                return {blk + "attn.wo.weight": value}
        return {_META_VISION + vkey: value}
    (meta_key,) = _meta_rule(key, tuple(value.shape)).keys
    return {meta_key: value}


def _meta_params(cfg: MultimodalConfig) -> dict:
    """params.json for ``cfg``; read back with ``config_from_meta_params`` it must give ``cfg.lm`` exactly."""
    lm = cfg.lm
    if lm.tie_embeddings:
        raise CheckpointError("Meta's layout has no tied embeddings")
    # No ffn_dim field: express it through Meta's sizing rule with multiple_of 1.
    multiplier = (lm.ffn_dim + 0.5) / int(2 * (4 * lm.dim) / 3)
    params = {
        "dim": lm.dim, "n_layers": lm.n_layers, "n_heads": lm.n_heads, "n_kv_heads": lm.n_kv_heads,
        "vocab_size": lm.vocab_size, "multiple_of": 1, "ffn_dim_multiplier": multiplier,
        "norm_eps": lm.norm_eps, "rope_theta": lm.rope_theta, "use_scaled_rope": lm.rope_scaling is not None,
        "max_seq_len": lm.max_seq_len,
        "vision_chunk_size": cfg.vision.tile_size, "vision_max_num_chunks": cfg.vision.max_tiles,
        "vision_num_cross_attention_layers": cfg.n_xattn,
    }
    if lm.rope_scaling is not None:
        params["rope_scaling_factor"] = lm.rope_scaling.factor
        params["rope_high_freq_factor"] = lm.rope_scaling.high_freq_factor
    assert meta_ffn_dim(lm.dim, 1, multiplier) == lm.ffn_dim
    if config_from_meta_params(params) != lm:
        raise CheckpointError(f"params.json cannot express this LM config exactly ({lm}); "
                              "Meta fixes low_freq_factor 1 and an original context of 8192")
    return params


def _merge_shards(shards: list[dict[str, Tensor]], files: list[Path]) -> dict[str, Tensor]:
    keys = set(shards[0])
    for f, s in zip(files[1:], shards[1:]):
        if set(s) != keys:
            raise CheckpointError(f"{f}: keys differ from {files[0].name}: {_few(sorted(keys ^ set(s)))}")
    if len(shards) == 1:
        return dict(shards[0])  # no copy: an 11B checkpoint is one 21 GB file
    merged = {}
    for key in shards[0]:
        parts = [s[key] for s in shards]
        dim = meta_vision_shard_dim(key)
        if dim is None:
            if not all(torch.equal(parts[0], p) for p in parts[1:]):
                raise CheckpointError(f"{files[0].parent}: {key} is replicated in Meta's layout but "
                                      "differs between shards")
            merged[key] = parts[0]
        else:
            merged[key] = torch.cat(parts, dim=dim)
    return merged


def mllama_config_from_meta(
    params: dict, vision_config: VisionEncoderConfig | None = None, source: str = "params.json"
) -> MultimodalConfig:
    """Our ``MultimodalConfig`` from a Llama 3.2 Vision params.json.

    ``vision_config``: the encoder sizes, which params.json cannot carry; default: the released
    ViT-H/14 at ``vision_chunk_size``. Its tile size and tile count must match params.json; its ``attn_bias``
    is set False, the layout's (Meta's vision attention has no biases).
    """
    missing = [k for k in ("vision_chunk_size", "vision_max_num_chunks", "vision_num_cross_attention_layers")
               if k not in params]
    if missing:
        raise CheckpointError(f"{source}: missing {missing}; not a Llama 3.2 Vision checkpoint")
    lm = config_from_meta_params(params, source)
    tile_size, max_tiles = params["vision_chunk_size"], params["vision_max_num_chunks"]
    vision = replace(vision_config or vision_encoder.vision_config("vit_h14", tile_size=tile_size), attn_bias=False)
    if (vision.tile_size, vision.max_tiles) != (tile_size, max_tiles):
        raise CheckpointError(f"{source}: vision_chunk_size/vision_max_num_chunks {tile_size}/{max_tiles} "
                              f"disagree with the vision config's tile_size/max_tiles "
                              f"{vision.tile_size}/{vision.max_tiles}")
    n_xattn = params["vision_num_cross_attention_layers"]
    every = _xattn_every(lm.n_layers, n_xattn, "vision_num_cross_attention_layers", source)
    return MultimodalConfig(lm=lm, vision=vision, xattn_every=every)


def load_meta_vision(
    path: str | Path, dtype: torch.dtype | None = None, vision_config: VisionEncoderConfig | None = None
) -> MultimodalLlama:
    """Load Meta's Llama 3.2 Vision directory (params.json + consolidated[.NN].pth); ``vision_config``
    as in ``mllama_config_from_meta`` (needed for encoders other than the released ViT-H/14)."""
    path = Path(path)
    params_file = path / "params.json"
    if not params_file.exists():
        raise CheckpointError(f"{path}: no params.json")
    cfg = mllama_config_from_meta(read_json(params_file), vision_config, str(params_file))
    files, shards = load_meta_shards(path)
    ckpt = _merge_shards(shards, files)
    ckpt.pop("text_model.rope.freqs", None)  # derived RoPE table
    learnable = ckpt.get("text_model.learnable_embedding.weight")
    if learnable is not None:  # max(model-parallel size, 8) rows in Meta's code
        cfg = replace(cfg, n_learnable_embeddings=learnable.shape[0])
    return _build(cfg, ckpt, _meta_rule, str(path), dtype)


def save_meta_vision(model: MultimodalLlama, path: str | Path, n_shards: int = 1) -> Path:
    """Write ``model`` in Meta's layout: params.json + ``consolidated.NN.pth`` model-parallel shards.

    Only ViT-H/14 encoders are described by params.json; others need ``vision_config`` when loading.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    params = _meta_params(model.cfg)
    sd: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        sd.update(_to_meta(key, value.detach().cpu()))
    shards: list[dict[str, Tensor]] = [{} for _ in range(n_shards)]
    for key, value in sd.items():
        dim = meta_vision_shard_dim(key)
        if dim is not None and value.shape[dim] % n_shards:
            raise CheckpointError(f"{key}: dim {dim} of size {value.shape[dim]} does not split into "
                                  f"{n_shards} shards")
        parts = [value] * n_shards if dim is None else value.chunk(n_shards, dim=dim)
        for shard, part in zip(shards, parts):
            shard[key] = part.clone()  # own storage, so each file holds only its slice
    (path / "params.json").write_text(json.dumps(params, indent=2))
    for i, shard in enumerate(shards):
        torch.save(shard, path / f"consolidated.{i:02d}.pth")
    return path
