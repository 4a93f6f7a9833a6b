"""Write an image model as a Hugging Face ``MllamaForConditionalGeneration`` checkpoint: the inverse of
``adapters.mllama.load_mllama``, driven by the same per-parameter rule (``_hf_rule``), and checked against it
before anything is written (every parameter made back from the written tensors by the reader's rule).

Files: ``config.json`` (``model_type`` mllama, ``text_config``, ``vision_config``, read back by our reader and
compared with the model's config), ``model.safetensors`` or ``model-0000k-of-0000n.safetensors`` +
``model.safetensors.index.json`` past ``max_shard_size`` (hub key names, which every transformers >= 4.45
loads), ``generation_config.json``, ``preprocessor_config.json`` (``MllamaImageProcessor`` with our tiling:
tile size, tile count, CLIP mean/std, bilinear) and, given the LM's ``tokenizer.model`` and transformers,
``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json`` through transformers'
``TikTokenConverter`` (offline). There ``<|image|>`` is id ``vocab_size`` (HF's ``image_token_index``, the
id our model feeds) and our ``n_base + 11`` slot becomes ``<|reserved_special_token_246|>``; a BOS is
prepended as by the hub's Llama 3 tokenizer. No chat template is written (apply_chat_template needs one).

Vision taps: ``intermediate_layers_indices`` is written with Meta's meaning (the *inputs* of those blocks),
as in the hub's own config.json, vLLM and our reader. transformers 4.45 .. 4.54 read it so (that range shares
the tap code and loads the hub key names; run here with 4.54.1 only, the README's reference); 4.55.x returns the last hidden state for every tap and 4.56+ takes the
output of block k, so they compute other features from this file, as they do from the released checkpoints.
No index list repairs 4.55.x, and shifted indices would make the file wrong everywhere else, so the indices
stay Meta's: config.json records ``transformers_version`` 4.54.1 and the range under ``llama3_mm_export``,
and `save_mllama_hf` warns (`HFExportWarning`) when the installed transformers is outside that range.

What transformers computes from the export equals our model on every row that sees an image. Rows before a
prompt's first ``<|image|>`` differ: HF adds ``tanh(gate_attn)`` times attention over all vision tokens there
(its "no image" row mask reaches only the MLP branch; see tests/adapters/test_mllama.py), so prompts that
start with ``<|image|>`` (HF's base-prompt layout) match, chat prompts with a header before it do not.

Refused, as `HFExportError` naming the reason: a model that is not a ``MultimodalLlama`` (a speech model),
a video adapter, a reward head, other than 8 learnable embedding rows (HF sizes ``embed_tokens`` as
vocab_size + 8), non-zero vision attention biases (open_clip's blocks have them, ``vision.attn_bias`` true;
Mllama's have none: all-zero ones are written as none, and an ``attn_bias`` false tower, as our Mllama loaders
build, has none to check), a cross-attention schedule other than the released rule, and any config our reader
does not give back (tied embeddings, ``pad_to_multiple`` != 8, an open_clip tower other than the release's
ViT-H/14 sizes...). Tile-grid cells no layout reaches ((3, 3) for 4 tiles) have no place in HF's per-layout
tables: the model never reads them, and they read back as zero; every other parameter round-trips bitwise
(all-zero attention biases come back as none: our reader builds ``attn_bias`` false).
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from importlib import metadata
from pathlib import Path

import torch
from torch import Tensor, nn

from adapters.checkpoint import CheckpointError, cast_floats, meta_to_hf_rope
from adapters.cross_attention import fusion_schedule
from adapters.mllama import (
    _BLOCK_RE,
    _HF_TILE_TABLES,
    _LAYER_RE,
    _From,
    _hf_rule,
    grid_to_tile_table,
    mllama_config_from_hf,
    unrolled_cross_attention_layers,
)
from adapters.multimodal import MultimodalConfig, MultimodalLlama
from adapters.tokenizer import (
    NAMED_SPECIAL_TOKENS,
    NUM_RESERVED_SPECIAL_TOKENS,
    PAT_STR,
    Tokenizer,
    TokenizerError,
    special_tokens,
)
from common.config import config_to_dict
from common.export import write_atomic
from vision.tiling import CLIP_MEAN, CLIP_STD, supported_layouts

CHECKED_TRANSFORMERS = "4.54.1"  # the version the export was compared with (tests/adapters/test_export_hf.py)
TRANSFORMERS_RANGE = ((4, 45), (4, 55))  # [first Mllama release, 4.55): taps read as block inputs
HF_LEARNABLE_ROWS = 8  # MllamaTextModel: nn.Embedding(vocab_size + 8, ...)
EMBED_KEY = "language_model.model.embed_tokens.weight"
# The name our <|image|> slot (n_base + 11) gets: the first reserved number our list does not use (246).
IMAGE_SLOT_NAME = f"<|reserved_special_token_{2 + NUM_RESERVED_SPECIAL_TOKENS - len(NAMED_SPECIAL_TOKENS)}|>"
SHARD_NAME = "model-{i:05d}-of-{n:05d}.safetensors"


class HFExportError(CheckpointError):
    """The model cannot be written as an HF Mllama checkpoint (the message names why), or the output is unusable."""


class HFExportWarning(UserWarning):
    """The installed transformers computes other vision features from the written file (see the module doc)."""


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes of ``5GB``, ``200KB``, ``1.5GiB`` or a plain count (decimal units, as transformers reads them)."""
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE_RE.match(text)
        if m is None:
            raise ValueError(f"not a size: {text!r} (e.g. 5GB, 500MB, 2GiB, 1000000)")
        value = int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])
    if value < 1:
        raise ValueError(f"size must be at least 1 byte, got {text!r}")
    return value


def transformers_warning() -> str | None:
    """Why the installed transformers would not compute our numbers from the export, or None (also when it is
    not installed: the file is for whichever transformers loads it)."""
    try:
        version = metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return None
    parts = tuple(int(p) for p in re.findall(r"\d+", version)[:2])
    low, high = TRANSFORMERS_RANGE
    if low <= parts < high:
        return None
    return (f"transformers {version} is installed; the export holds Meta's vision tap indices, which transformers "
            f"{low[0]}.{low[1]} .. {high[0]}.{high[1] - 1} read as block inputs (checked with {CHECKED_TRANSFORMERS}); "
            f"4.55.x takes the last hidden state for every tap and 4.56+ the output of each block, so this version "
            f"computes other image features from it (as it does from the released checkpoints)")


# ----------------------------------------------------------------------------------------------
# Config


def _token_ids(vocab_size: int) -> dict[str, int]:
    """Our special-token layout (`adapters.tokenizer.special_tokens`) for an LM of ``vocab_size`` ids."""
    return special_tokens(vocab_size - NUM_RESERVED_SPECIAL_TOKENS)


def hf_mllama_config(cfg: MultimodalConfig, dtype: torch.dtype) -> dict:
    """config.json of ``cfg`` as transformers' ``MllamaConfig.to_dict()`` lays it out (the fields it reads)."""
    lm, vis = cfg.lm, cfg.vision
    ids = _token_ids(lm.vocab_size)
    bos, eos, pad = ids["<|begin_of_text|>"], ids["<|eot_id|>"], ids["<|finetune_right_pad_id|>"]
    scaling = None if lm.rope_scaling is None else {"rope_type": "llama3", **config_to_dict(lm.rope_scaling)}
    text = {
        "model_type": "mllama_text_model", "vocab_size": lm.vocab_size, "hidden_size": lm.dim,
        "num_hidden_layers": lm.n_layers + cfg.n_xattn,
        "cross_attention_layers": unrolled_cross_attention_layers(lm.n_layers, cfg.n_xattn),
        "num_attention_heads": lm.n_heads, "num_key_value_heads": lm.n_kv_heads, "intermediate_size": lm.ffn_dim,
        "hidden_act": "silu", "rms_norm_eps": lm.norm_eps, "rope_theta": lm.rope_theta, "rope_scaling": scaling,
        "max_position_embeddings": lm.max_seq_len, "tie_word_embeddings": False, "use_cache": True,
        "dropout": 0.0, "initializer_range": 0.02, "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    vision = {
        "model_type": "mllama_vision_model", "hidden_size": vis.width, "hidden_act": "gelu",
        "num_hidden_layers": vis.layers, "num_global_layers": vis.n_global_layers, "attention_heads": vis.heads,
        "num_channels": 3, "intermediate_size": int(vis.width * vis.mlp_ratio), "vision_output_dim": vis.out_dim,
        "image_size": vis.tile_size, "patch_size": vis.patch_size, "norm_eps": 1e-5, "max_num_tiles": vis.max_tiles,
        "intermediate_layers_indices": list(vis.taps),  # Meta's meaning: block inputs (module docstring)
        "supported_aspect_ratios": [list(r) for r in supported_layouts(vis.max_tiles)],
        "initializer_range": 0.02, "torch_dtype": str(dtype).removeprefix("torch."),
    }
    low, high = TRANSFORMERS_RANGE
    return {
        "architectures": ["MllamaForConditionalGeneration"], "model_type": "mllama",
        "image_token_index": lm.vocab_size, "text_config": text, "vision_config": vision,
        "tie_word_embeddings": False, "torch_dtype": str(dtype).removeprefix("torch."),
        "transformers_version": CHECKED_TRANSFORMERS,
        "llama3_mm_export": {"transformers": f">={low[0]}.{low[1]},<{high[0]}.{high[1]}",
                             "intermediate_layers_indices": "block inputs (Meta, transformers <= 4.54)"},
    }


def _diff(want: object, got: object, prefix: str = "") -> list[str]:
    """Dotted paths where two config dicts differ, with both values."""
    if isinstance(want, dict) and isinstance(got, dict):
        return [d for k in want.keys() | got.keys() for d in _diff(want.get(k), got.get(k), f"{prefix}{k}.")]
    return [] if want == got else [f"{prefix.rstrip('.')} {want!r} (model) vs {got!r} (Mllama)"]


def check_expressible(model: nn.Module) -> None:
    """`HFExportError` naming the first thing about ``model``'s shape that an Mllama checkpoint cannot hold."""
    if not isinstance(model, MultimodalLlama):
        kind = "a speech model" if "speech" in type(model).__name__.lower() else "not an image model"
        raise HFExportError(f"{type(model).__name__} is {kind}: Mllama holds an image adapter on Llama only "
                            f"(no speech part)")
    cfg = model.cfg
    if cfg.video is not None:
        raise HFExportError("the model has a video adapter (cfg.video): Mllama has no video part")
    if cfg.reward_head:
        raise HFExportError("the model has a reward head (cfg.reward_head): Mllama has no reward head")
    if cfg.n_learnable_embeddings != HF_LEARNABLE_ROWS:
        raise HFExportError(f"{cfg.n_learnable_embeddings} learnable embedding rows: Mllama's embed_tokens has "
                            f"vocab_size + {HF_LEARNABLE_ROWS} rows")
    if cfg.lm.tie_embeddings:
        raise HFExportError(f"the LM ties its input and output embeddings: Mllama's lm_head ({cfg.lm.vocab_size} "
                            f"rows) and embed_tokens (vocab_size + {HF_LEARNABLE_ROWS} rows) are separate")
    released = fusion_schedule(cfg.lm.n_layers, cfg.n_xattn)
    if model.schedule != released:
        raise HFExportError(f"cross-attention before LM layers {model.schedule} (xattn_every {cfg.xattn_every}): "
                            f"Mllama's cross_attention_layers express only the released schedule {released} for "
                            f"{cfg.lm.n_layers} layers and {cfg.n_xattn} blocks")
    hf = hf_mllama_config(cfg, torch.float32)
    try:
        back = mllama_config_from_hf(hf, "the Mllama config.json")
    except CheckpointError as e:
        raise HFExportError(f"not expressible in Mllama: {e}") from None
    # Training switches and the encoder's initial weights are not the model's shape; the schedule is checked above.
    # Attention biases (attn_bias=True) are written as Mllama's none when all zero, which `_to_hf` checks.
    ours = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, pretrained=None, attn_bias=False),
                               train_vision=back.train_vision, train_image_token_rows=back.train_image_token_rows,
                               xattn_every=back.xattn_every)
    back = dataclasses.replace(back, n_learnable_embeddings=HF_LEARNABLE_ROWS)
    if differs := sorted(_diff(config_to_dict(ours), config_to_dict(back))):
        raise HFExportError(f"not expressible in Mllama: {'; '.join(differs)}")


# ----------------------------------------------------------------------------------------------
# Weights: our state dict -> HF (hub key names), checked with the reader's rule


def _reachable(max_tiles: int) -> Tensor:
    """(T, T) bool: tile-grid cells some supported layout uses."""
    cells = torch.zeros(max_tiles, max_tiles, dtype=torch.bool)
    for h, w in supported_layouts(max_tiles):
        cells[:h, :w] = True
    return cells


def _to_hf(cfg: MultimodalConfig, key: str, value: Tensor, source: _From) -> dict[str, Tensor]:
    """One of our parameters (not the embedding rows) -> its HF tensor(s): the inverse of ``source.fn``."""
    if key.startswith("vision."):
        vkey = key.removeprefix("vision.")
        if vkey in _HF_TILE_TABLES:
            return {source.keys[0]: grid_to_tile_table(value)}
        m = _BLOCK_RE.match(vkey)
        if m is not None and m.group(3) in ("attn.in_proj_bias", "attn.out_proj.bias"):  # attn_bias=True only
            if value.any():
                raise HFExportError(f"{key} is non-zero: Mllama's vision attention has no biases (open_clip's "
                                    f"blocks do); train with vision.attn_bias: false (the Mllama layout has none)")
            return {}
        if m is not None and m.group(3) == "attn.in_proj_weight":  # open_clip packs q, k, v row-wise
            return {k: part.clone() for k, part in zip(source.keys, value.chunk(3, dim=0))}
    m = _LAYER_RE.match(key)
    if m is not None and m.group(1) == "lm.layers" and m.group(3) in ("attention.wq.weight", "attention.wk.weight"):
        heads = cfg.lm.n_heads if m.group(3) == "attention.wq.weight" else cfg.lm.n_kv_heads
        return {source.keys[0]: meta_to_hf_rope(value, heads).contiguous()}
    (hf_key,) = source.keys
    return {hf_key: value}


def hf_state_dict(model: MultimodalLlama, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """``model``'s weights under the hub's Mllama names (cast to ``dtype`` when given), in our state-dict order.

    Every parameter is then made back from them by the reader's rule and must equal the original (tile-grid
    cells no layout reaches excepted, which come back as zero): a mapping that would not round-trip is an
    `HFExportError` here, before anything is written.
    """
    cfg = model.cfg
    rule = _hf_rule(cfg)
    sd = cast_floats({k: v.detach().cpu() for k, v in model.state_dict().items()}, dtype)
    plan = {}
    for key, value in sd.items():
        try:
            plan[key] = rule(key, tuple(value.shape))
        except KeyError:
            raise HFExportError(f"{key}: no place for this parameter in an Mllama checkpoint") from None
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key == "lm.tok_embeddings.weight":  # frozen rows, then the learnable rows (<|image|> first)
            out[EMBED_KEY] = torch.cat([value, sd["learnable_embedding.weight"].to(value.dtype)])
        elif key != "learnable_embedding.weight":
            out.update(_to_hf(cfg, key, value, plan[key]))
    reachable = _reachable(cfg.vision.max_tiles)
    for key, value in sd.items():
        back = plan[key].fn([out[k] for k in plan[key].keys])
        want = value
        if key.removeprefix("vision.") in _HF_TILE_TABLES:
            want = value * reachable[:, :, None, None].to(value.dtype)
        if back.dtype != want.dtype or not torch.equal(back, want):
            raise HFExportError(f"{key}: the written tensor does not read back equal (converter out of date)")
    return out


def _shards(sd: dict[str, Tensor], max_bytes: int) -> list[dict[str, Tensor]]:
    """Consecutive groups of at most ``max_bytes`` (a larger tensor alone), as ``save_pretrained`` splits."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for key, value in sd.items():
        n = value.numel() * value.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += n
    return shards


# ----------------------------------------------------------------------------------------------
# Processor and tokenizer files


def preprocessor_config(cfg: MultimodalConfig) -> dict:
    """``MllamaImageProcessor`` settings that tile as `vision.tiling.tile_image` does for ``cfg``."""
    return {
        "image_processor_type": "MllamaImageProcessor", "processor_class": "MllamaProcessor",
        "do_convert_rgb": True, "do_resize": True, "do_rescale": True, "do_normalize": True, "do_pad": True,
        "size": {"height": cfg.vision.tile_size, "width": cfg.vision.tile_size},
        "max_image_tiles": cfg.vision.max_tiles, "resample": 2,  # PIL bilinear, TilingConfig's default
        "rescale_factor": 1 / 255, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
    }


def generation_config(cfg: MultimodalConfig) -> dict:
    ids = _token_ids(cfg.lm.vocab_size)
    return {"bos_token_id": ids["<|begin_of_text|>"], "pad_token_id": ids["<|finetune_right_pad_id|>"],
            "eos_token_id": [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]],
            "transformers_version": CHECKED_TRANSFORMERS}


def hf_special_tokens(n_base: int) -> list[str]:
    """HF's special tokens in id order from ``n_base``: ours, with ``<|image|>`` moved to ``n_base + 256``."""
    names = list(special_tokens(n_base))
    names[names.index("<|image|>")] = IMAGE_SLOT_NAME
    return names + ["<|image|>"]


def hf_tokenizer(tokenizer_path: str | Path, vocab_size: int):
    """Our ``tokenizer.model`` as a ``PreTrainedTokenizerFast`` (its ``save_pretrained`` writes tokenizer.json,
    tokenizer_config.json and special_tokens_map.json)."""
    try:
        tok = Tokenizer(tokenizer_path)
    except TokenizerError as e:
        raise HFExportError(str(e)) from None
    if tok.n_words != vocab_size:
        raise HFExportError(f"{tokenizer_path}: {tok.n_words} token ids, but the LM's vocab_size is {vocab_size}")
    try:
        from tokenizers import processors
        from transformers import PreTrainedTokenizerFast
        from transformers.convert_slow_tokenizer import TikTokenConverter
    except ImportError as e:
        raise HFExportError(f"writing tokenizer.json needs transformers and tokenizers ({e}); "
                            f"export without the tokenizer or install them") from None
    names = hf_special_tokens(tok.n_base)
    backend = TikTokenConverter(vocab_file=str(tokenizer_path), pattern=PAT_STR,
                                additional_special_tokens=names).converted()
    if backend.token_to_id("<|image|>") != vocab_size or backend.get_vocab_size() != vocab_size + 1:
        raise HFExportError(f"{tokenizer_path}: the converted vocabulary does not put <|image|> at {vocab_size}")
    bos = "<|begin_of_text|>"
    backend.post_processor = processors.Sequence([  # the hub's Llama 3 tokenizer.json: BOS first
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                      special_tokens=[(bos, tok.bos_id)]),
    ])
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token="<|eot_id|>",
                                   pad_token="<|finetune_right_pad_id|>", clean_up_tokenization_spaces=True,
                                   model_input_names=["input_ids", "attention_mask"])
    return fast


# ----------------------------------------------------------------------------------------------
# The writer


def check_out_dir(out_dir: str | Path) -> Path:
    """``out_dir`` as a Path; an existing non-empty directory (or a file) is an `HFExportError`."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HFExportError(f"{out}: exists and is not an empty directory; choose a new output directory")
    return out


def _json(path: Path, obj: dict) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def save_mllama_hf(model: MultimodalLlama, out_dir: str | Path, tokenizer_path: str | Path | None = None,
                   dtype: torch.dtype | None = None, max_shard_size: int | str = "5GB") -> Path:
    """Write ``model`` into the new (or empty) directory ``out_dir`` as an HF Mllama checkpoint (module doc).

    ``dtype``: of the written floats (default: the model's); ``max_shard_size``: bytes or ``"5GB"``-style,
    past which the weights go to several files with an index. Everything is checked before the first file is
    written; config.json comes last.
    """
    out = check_out_dir(out_dir)
    max_bytes = parse_size(max_shard_size)
    check_expressible(model)
    if problem := transformers_warning():
        warnings.warn(problem, HFExportWarning, stacklevel=2)
    sd = hf_state_dict(model, dtype)
    weight_dtype = next(v.dtype for v in sd.values() if v.is_floating_point())
    config = hf_mllama_config(model.cfg, weight_dtype)
    tokenizer = None if tokenizer_path is None else hf_tokenizer(tokenizer_path, model.cfg.lm.vocab_size)

    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    shards = _shards(sd, max_bytes)
    names = ["model.safetensors"] if len(shards) == 1 else [
        SHARD_NAME.format(i=i + 1, n=len(shards)) for i in range(len(shards))]
    for name, shard in zip(names, shards):
        write_atomic(out / name, lambda tmp, s=shard: save_file(s, str(tmp), metadata={"format": "pt"}))
    if len(shards) > 1:
        total = sum(v.numel() * v.element_size() for v in sd.values())
        weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
        _json(out / "model.safetensors.index.json",
              {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    _json(out / "preprocessor_config.json", preprocessor_config(model.cfg))
    _json(out / "generation_config.json", generation_config(model.cfg))
    _json(out / "config.json", config)
    return out
