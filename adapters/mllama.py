"""Load Llama 3.2 Vision ("Mllama") checkpoints into ``MultimodalLlama``: the Hugging Face layout here,
Meta's in ``adapters.mllama_meta`` (sharing the key-mapping machinery below), and
``adapters.model_io.load_multimodal_checkpoint`` picks the loader from a directory's files.

HF:   ``config.json`` (``text_config``, ``vision_config``) + safetensors (one file, or shards with
      ``model.safetensors.index.json``). Keys as on the hub (``language_model.model.*``,
      ``language_model.lm_head.*``, ``vision_model.*``, ``multi_modal_projector.*``) or as transformers
      >= 4.52 writes them (``model.language_model.*``, ``lm_head.*``, ``model.vision_model.*``,
      ``model.multi_modal_projector.*``).
Meta: ``params.json`` + ``consolidated[.NN].pth`` model-parallel shards. The vision hyper-parameters are
      code constants in Meta's release (ViT-H/14, 32 + 8 layers, taps 3,7,15,23,30), not in params.json.

Conversion is driven by our model's own state dict: for each of our parameters we know which checkpoint
key(s) it is made from, so missing and unknown keys are both reported under their checkpoint names.
The mapping follows notes/mllama.md sec. 2 (HF's ``convert_mllama_weights_to_hf.py``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from adapters.checkpoint import (
    CheckpointError,
    cast_floats,
    read_json,
    config_from_hf,
    hf_to_meta_rope,
    load_state_dict_strict,
    read_safetensors_dir,
)
from adapters.cross_attention import fusion_schedule, xattn_schedule
from adapters.llama import Llama, LlamaConfig
from adapters.multimodal import MultimodalConfig, MultimodalLlama
from common.rope import rope_frequencies
from vision import encoder as vision_encoder
from vision.encoder import VisionEncoderConfig
from vision.tiling import supported_layouts

# ----------------------------------------------------------------------------------------------
# Configs


def unrolled_cross_attention_layers(n_layers: int, n_xattn: int) -> list[int]:
    """HF's ``cross_attention_layers``: where our fusion schedule lands in the unrolled layer list.

    Cross-attention block j runs before self-attention layer s_j, so in HF's single list of
    ``n_layers + n_xattn`` layers it sits at s_j + j: [3, 8, ..., 38] for 11B (32 + 8 layers), the
    converter's ``range(freq - 1, total, freq + 1)``.
    """
    return [s + j for j, s in enumerate(fusion_schedule(n_layers, n_xattn))]


def _xattn_every(n_layers: int, n_xattn: int, field_name: str, source: str) -> int:
    """The ``MultimodalConfig.xattn_every`` whose schedule is the released one for ``n_xattn`` blocks."""
    every = math.ceil(n_layers / n_xattn)
    if n_layers // every == n_xattn and xattn_schedule(n_layers, every) == fusion_schedule(n_layers, n_xattn):
        return every
    raise CheckpointError(
        f"{source}: {field_name}: {n_xattn} cross-attention layers over {n_layers} self-attention layers "
        "is not expressible as one block every xattn_every layers"
    )


def _lm_config_from_hf(config: dict, text: dict, source: str) -> tuple[LlamaConfig, int]:
    """The frozen LM's config and ``xattn_every`` from ``text_config`` (HF counts both kinds of layers)."""
    cross = [int(i) for i in text["cross_attention_layers"]]
    n_layers = text["num_hidden_layers"] - len(cross)
    if text.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: text_config.hidden_act {text['hidden_act']!r} is not 'silu'")
    as_llama = {**text, "model_type": "llama", "num_hidden_layers": n_layers}
    lm = config_from_hf(as_llama, f"{source}: text_config")
    if lm.tie_embeddings:  # the head has vocab_size rows, the embedding vocab_size + 8: never tied
        raise CheckpointError(f"{source}: text_config.tie_word_embeddings is true; Mllama does not tie them")
    every = _xattn_every(n_layers, len(cross), "text_config.cross_attention_layers", source)
    expected = unrolled_cross_attention_layers(n_layers, len(cross))
    if cross != expected:
        raise CheckpointError(f"{source}: text_config.cross_attention_layers {cross} is not the released "
                              f"schedule for {n_layers} + {len(cross)} layers ({expected})")
    image_token = config.get("image_token_index", config.get("image_token_id", 128256))
    if image_token != lm.vocab_size:
        raise CheckpointError(f"{source}: image_token_index {image_token} must equal text_config.vocab_size "
                              f"{lm.vocab_size} (the first learnable embedding row)")
    return lm, every


def _vision_config_from_hf(vis: dict, source: str) -> VisionEncoderConfig:
    width, max_tiles = vis["hidden_size"], vis["max_num_tiles"]
    # HF <= 4.54 (and Meta) tap the *inputs* of these blocks, as our encoder does; HF >= 4.56 reads the
    # same field as block outputs (notes/mllama.md sec. 1.2). The checkpoint's meaning is Meta's.
    taps = tuple(vis["intermediate_layers_indices"])
    fixed = {
        # Our encoder hard-codes these as released (open_clip LayerNorm eps 1e-5, exact GELU, RGB).
        "norm_eps": (vis.get("norm_eps", 1e-5), 1e-5),
        "hidden_act": (vis.get("hidden_act", "gelu"), "gelu"),
        "num_channels": (vis.get("num_channels", 3), 3),
        "vision_output_dim": (vis.get("vision_output_dim", width * (1 + len(taps))), width * (1 + len(taps))),
        "supported_aspect_ratios": (
            [list(r) for r in vis.get("supported_aspect_ratios", supported_layouts(max_tiles))],
            [list(r) for r in supported_layouts(max_tiles)],
        ),
    }
    for name, (got, want) in fixed.items():
        if got != want:
            raise CheckpointError(
                f"{source}: vision_config.{name} {got!r} is not supported (expected {want!r})"
            )
    mlp_ratio = vis["intermediate_size"] / width
    if int(width * mlp_ratio) != vis["intermediate_size"]:  # open_clip sizes its MLP as int(width * ratio)
        raise CheckpointError(f"{source}: vision_config.intermediate_size {vis['intermediate_size']} "
                              f"cannot be expressed as an MLP ratio of hidden_size {width}")
    fields = dict(
        width=width,
        layers=vis["num_hidden_layers"],
        heads=vis["attention_heads"] if "attention_heads" in vis else vis["num_attention_heads"],
        patch_size=vis["patch_size"],
        mlp_ratio=mlp_ratio,
        tile_size=vis["image_size"],
        max_tiles=max_tiles,
        taps=taps,
        n_global_layers=vis["num_global_layers"],
    )
    # The open_clip ViT-H-14 tower when the sizes are the release's, else a tower built from the fields;
    # without attention biases either way (Mllama's have none: no parameters, nothing trains them).
    vit_h = vision_encoder.vision_config("vit_h14", tile_size=fields["tile_size"])
    cfg = replace(vit_h, **fields)
    return replace(cfg, attn_bias=False, open_clip_model=cfg.open_clip_model if cfg == vit_h else None)


def mllama_config_from_hf(config: dict, source: str = "config.json") -> MultimodalConfig:
    """Our ``MultimodalConfig`` from an HF ``MllamaConfig`` dict; what we cannot represent is an error."""
    if config.get("model_type") != "mllama":
        raise CheckpointError(f"{source}: model_type {config.get('model_type')!r} is not 'mllama'")
    text, vis = config.get("text_config"), config.get("vision_config")
    if not isinstance(text, dict) or not isinstance(vis, dict):
        raise CheckpointError(f"{source}: needs text_config and vision_config objects")
    try:
        lm, every = _lm_config_from_hf(config, text, source)
        vision = _vision_config_from_hf(vis, source)
    except KeyError as e:
        raise CheckpointError(f"{source}: missing required key {e.args[0]!r}") from None
    except CheckpointError:
        raise
    except (ValueError, TypeError) as e:  # the config dataclasses' own validation
        raise CheckpointError(f"{source}: {e}") from None
    return MultimodalConfig(lm=lm, vision=vision, xattn_every=every)


# ----------------------------------------------------------------------------------------------
# HF's precomputed tile tables <-> Meta's (and our) tile grids


def grid_to_tile_table(grid: Tensor) -> Tensor:
    """(T, T, N, W) grid -> HF's table (1 + n_layouts, T * N * W): row i+1 holds ``grid[:h, :w]`` for
    the i-th layout of ``supported_layouts(T)`` in its first h*w tile slots, row 0 (padding) is zero."""
    T, _, N, W = grid.shape
    layouts = supported_layouts(T)
    table = grid.new_zeros(len(layouts) + 1, T, N, W)
    for i, (h, w) in enumerate(layouts):
        table[i + 1, : h * w] = grid[:h, :w].reshape(h * w, N, W)
    return table.flatten(1)


def tile_table_to_grid(table: Tensor, max_tiles: int, n_tokens: int, width: int, name: str) -> Tensor:
    """Invert HF's precomputed table (see ``grid_to_tile_table``) into a (T, T, N, W) grid.

    Every grid cell is read from the layouts that cover it, which must agree; cells no layout reaches
    (e.g. (3, 3) for 4 tiles) are never used and come back as zeros. Row 0 belongs to padding images
    (aspect_ratio_id 0), whose outputs are masked out, so it is not read. The slots after h*w in a
    layout's row must be zero: HF adds them to that image's padded tiles, which real tokens attend to,
    and a grid cannot express that. Tables written by HF's converter have exactly this structure.
    """
    layouts = supported_layouts(max_tiles)
    shape = (len(layouts) + 1, max_tiles * n_tokens * width)
    if tuple(table.shape) != shape:
        raise CheckpointError(f"{name}: shape {tuple(table.shape)}, expected {shape}")
    rows = table.view(len(layouts) + 1, max_tiles, n_tokens, width)
    grid = table.new_zeros(max_tiles, max_tiles, n_tokens, width)
    seen = [[False] * max_tiles for _ in range(max_tiles)]
    for i, (h, w) in enumerate(layouts):
        if rows[i + 1, h * w :].any():
            raise CheckpointError(f"{name}: row {i + 1} (layout {h}x{w}) is non-zero in its padding tile "
                                  f"slots {h * w}..{max_tiles - 1}; only a per-cell grid can be loaded")
        cells = rows[i + 1, : h * w].view(h, w, n_tokens, width)
        for r in range(h):
            for c in range(w):
                if not seen[r][c]:
                    grid[r, c], seen[r][c] = cells[r, c], True
                elif not torch.equal(grid[r, c], cells[r, c]):
                    raise CheckpointError(f"{name}: tile cell ({r}, {c}) differs between layouts (row "
                                          f"{i + 1}, layout {h}x{w}, vs. an earlier row): not one grid")
    return grid


# ----------------------------------------------------------------------------------------------
# Conversion driven by our state dict


def _first(parts: list[Tensor]) -> Tensor:
    return parts[0]


@dataclass(frozen=True)
class _From:
    """One of our parameters: the checkpoint keys it is made of and how."""

    keys: tuple[str, ...]
    fn: Callable[[list[Tensor]], Tensor] = _first


def _zeros(shape: tuple[int, ...]) -> Callable[[list[Tensor]], Tensor]:
    """Attention biases the release does not have, as an ``attn_bias=True`` tower reads them: zeros in the
    sibling's dtype. Our loaders build ``attn_bias=False`` towers, which ask for none; the HF writer checks an
    ``attn_bias=True`` model's biases against these zeros."""
    return lambda parts: parts[0].new_zeros(shape)


def _few(keys: list[str], n: int = 10) -> str:
    return f"{keys[:n]}{f' ... ({len(keys)} in all)' if len(keys) > n else ''}"


def _build(
    cfg: MultimodalConfig,
    ckpt: dict[str, Tensor],
    rule: Callable[[str, tuple[int, ...]], _From],
    source: str,
    dtype: torch.dtype | None,
    show: Callable[[str], str] = lambda k: k,
) -> MultimodalLlama:
    """The model for ``cfg`` with every parameter made from ``ckpt`` by ``rule`` (our key, shape -> _From).

    Checkpoint keys no parameter asks for are unknown, asked-for keys the checkpoint lacks are missing;
    both are reported under the checkpoint's names (``show`` renders them in its own key layout).
    """
    with torch.device("meta"):  # shapes only; the checkpoint's tensors are assigned in place
        model = MultimodalLlama(cfg, Llama(cfg.lm))
    plan = {key: rule(key, tuple(p.shape)) for key, p in model.state_dict().items()}
    wanted = {k for f in plan.values() for k in f.keys}
    missing, unknown = sorted(wanted - ckpt.keys()), sorted(ckpt.keys() - wanted)
    if missing or unknown:
        raise CheckpointError(f"{source}: missing keys {_few([show(k) for k in missing])}; "
                              f"unknown keys {_few([show(k) for k in unknown])}")
    sd = {key: f.fn([ckpt[k] for k in f.keys]) for key, f in plan.items()}
    sd = cast_floats(sd, dtype)
    load_state_dict_strict(model, sd, source)  # shapes, and the final key set once more
    # Non-persistent buffer: recompute on the weights' device.
    model.lm.inv_freq = rope_frequencies(cfg.lm.head_dim, cfg.lm.rope_theta, cfg.lm.rope_scaling).to(
        model.lm.tok_embeddings.weight.device
    )
    return model


_BLOCK_RE = re.compile(r"^(transformer|global_transformer)\.resblocks\.(\d+)\.(.+)$")
_LAYER_RE = re.compile(r"^(lm\.layers|cross_attention_layers)\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class _VisionNames:
    """How a checkpoint names our vision tower's parameters (the parts HF and Meta share in shape)."""

    prefix: str  # of every vision key
    block: str  # a block's prefix, formatted with stack ("transformer"/"global_transformer") and i
    qkv: tuple[str, str, str]  # separate q/k/v weights (open_clip packs them into in_proj_weight)
    wo: str
    names: dict[str, str]  # our name -> theirs, outside the blocks (default: the same)
    block_names: dict[str, str]  # inside a block (default: the same)

    def rule(self, key: str, shape: tuple[int, ...]) -> _From:
        """``key`` relative to our ``vision.``."""
        m = _BLOCK_RE.match(key)
        if m is None:
            return _From((self.prefix + self.names.get(key, key),))
        blk = self.prefix + self.block.format(stack=m.group(1), i=m.group(2))
        rest = m.group(3)
        if rest == "attn.in_proj_weight":  # open_clip packs q, k, v row-wise in that order
            return _From(tuple(blk + k for k in self.qkv), lambda parts: torch.cat(parts, dim=0))
        if rest == "attn.in_proj_bias":
            return _From((blk + self.qkv[0],), _zeros(shape))
        if rest == "attn.out_proj.bias":
            return _From((blk + self.wo,), _zeros(shape))
        if rest == "attn.out_proj.weight":
            return _From((blk + self.wo,))
        return _From((blk + self.block_names.get(rest, rest),))


# ----------------------------------------------------------------------------------------------
# Hugging Face layout

# transformers >= 4.52 prefixes -> the hub's legacy ones (inverse of HF's _checkpoint_conversion_mapping).
_NEW_TO_LEGACY = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_model.", "vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
)

_HF_TEXT_COMMON = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
}
_HF_SELF = {**_HF_TEXT_COMMON, **{f"attention.w{p}.weight": f"self_attn.{p}_proj.weight" for p in "qkvo"}}
_HF_CROSS = {
    **_HF_TEXT_COMMON,
    **{f"attention.w{p}.weight": f"cross_attn.{p}_proj.weight" for p in "qkvo"},
    "attention.q_norm.weight": "cross_attn.q_norm.weight",
    "attention.k_norm.weight": "cross_attn.k_norm.weight",
    "gate_attn": "cross_attn_attn_gate",
    "gate_ffwd": "cross_attn_mlp_gate",
}
_HF_VISION = {
    "conv1.weight": "patch_embedding.weight",
    "positional_embedding": "gated_positional_embedding.embedding",
    "gated_positional_embedding_gate": "gated_positional_embedding.gate",
    "pre_tile_pos_embed.gate": "pre_tile_positional_embedding.gate",
    "post_tile_pos_embed.gate": "post_tile_positional_embedding.gate",
    "ln_pre.weight": "layernorm_pre.weight", "ln_pre.bias": "layernorm_pre.bias",
    "ln_post.weight": "layernorm_post.weight", "ln_post.bias": "layernorm_post.bias",
}
_HF_TILE_TABLES = {
    "gated_positional_embedding": "gated_positional_embedding.tile_embedding.weight",
    "pre_tile_pos_embed.embedding": "pre_tile_positional_embedding.embedding.weight",
    "post_tile_pos_embed.embedding": "post_tile_positional_embedding.embedding.weight",
}
_HF_VISION_NAMES = _VisionNames(
    prefix="vision_model.",
    block="{stack}.layers.{i}.",
    qkv=("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    wo="self_attn.o_proj.weight",
    names=_HF_VISION,
    block_names={
        "ln_1.weight": "input_layernorm.weight", "ln_1.bias": "input_layernorm.bias",
        "ln_2.weight": "post_attention_layernorm.weight", "ln_2.bias": "post_attention_layernorm.bias",
        "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
        "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
    },
)


def _legacy_hf_keys(sd: dict[str, Tensor], source: str) -> tuple[dict[str, Tensor], Callable[[str], str]]:
    """Keys in the legacy hub layout, plus a function naming a key as the checkpoint's own layout does."""
    out: dict[str, Tensor] = {}
    new_layout = False
    for key, value in sd.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue  # a derived buffer some exports carry
        canon = key
        for new, old in _NEW_TO_LEGACY:
            if key.startswith(new):
                canon, new_layout = old + key[len(new):], True
                break
        if canon in out:
            raise CheckpointError(f"{source}: {key} is present under both the legacy and the new key layout")
        out[canon] = value

    def show(key: str) -> str:
        for new, old in _NEW_TO_LEGACY:
            if new_layout and key.startswith(old):
                return new + key[len(old):]
        return key

    return out, show


def _hf_rule(cfg: MultimodalConfig) -> Callable[[str, tuple[int, ...]], _From]:
    """Our parameter -> its source in a (legacy-named) HF Mllama checkpoint."""
    lm = cfg.lm
    cross_layers = unrolled_cross_attention_layers(lm.n_layers, cfg.n_xattn)
    self_layers = [i for i in range(lm.n_layers + cfg.n_xattn) if i not in cross_layers]
    text = "language_model.model."
    embed = text + "embed_tokens.weight"  # frozen vocab rows, then the learnable rows (<|image|> first)

    def rule(key: str, shape: tuple[int, ...]) -> _From:
        if key == "lm.tok_embeddings.weight":
            # Cloned: tensors sharing storage cannot be written by safetensors later.
            return _From((embed,), lambda parts: parts[0][: lm.vocab_size].clone())
        if key == "learnable_embedding.weight":
            return _From((embed,), lambda parts: parts[0][lm.vocab_size:].clone())
        if key == "lm.norm.weight":
            return _From((text + "norm.weight",))
        if key == "lm.output.weight":
            return _From(("language_model.lm_head.weight",))
        if key.startswith("projector."):
            return _From(("multi_modal_projector." + key.removeprefix("projector."),))
        m = _LAYER_RE.match(key)
        if m is not None:
            group, i, rest = m.group(1), int(m.group(2)), m.group(3)
            if group == "cross_attention_layers":  # no RoPE in cross-attention: no q/k permutation
                return _From((f"{text}layers.{cross_layers[i]}.{_HF_CROSS[rest]}",))
            hf_key = f"{text}layers.{self_layers[i]}.{_HF_SELF[rest]}"
            if rest in ("attention.wq.weight", "attention.wk.weight"):
                heads = lm.n_heads if rest == "attention.wq.weight" else lm.n_kv_heads
                return _From((hf_key,), lambda parts: hf_to_meta_rope(parts[0], heads))
            return _From((hf_key,))
        if key.startswith("vision."):
            vkey = key.removeprefix("vision.")
            if vkey in _HF_TILE_TABLES:
                hf_key = _HF_VISION_NAMES.prefix + _HF_TILE_TABLES[vkey]
                T, _, N, W = shape
                return _From((hf_key,), lambda parts: tile_table_to_grid(parts[0], T, N, W, hf_key))
            return _HF_VISION_NAMES.rule(vkey, shape)
        raise KeyError(f"no HF Mllama source for our parameter {key!r}")  # converter out of date

    return rule


def load_mllama(path: str | Path, dtype: torch.dtype | None = None) -> MultimodalLlama:
    """Load an HF Mllama directory (``MllamaForConditionalGeneration.save_pretrained`` or the hub)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: no config.json")
    hf_config = read_json(cfg_file)
    cfg = mllama_config_from_hf(hf_config, str(cfg_file))
    ckpt, show = _legacy_hf_keys(read_safetensors_dir(path), str(path))
    embed = ckpt.get("language_model.model.embed_tokens.weight")
    if embed is not None:  # HF appends 8 rows; read the count from the table itself
        cfg = replace(cfg, n_learnable_embeddings=embed.shape[0] - cfg.lm.vocab_size)
        if cfg.n_learnable_embeddings < 1:
            name = show("language_model.model.embed_tokens.weight")
            raise CheckpointError(f"{path}: {name} has {embed.shape[0]} rows, no learnable rows after "
                                  f"vocab_size {cfg.lm.vocab_size}")
    return _build(cfg, ckpt, _hf_rule(cfg), str(path), dtype, show)
