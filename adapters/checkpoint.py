"""Load Llama 3 checkpoints users own, in Meta's or Hugging Face's layout, into ``adapters.llama.Llama``.

Meta: ``params.json`` + ``consolidated.NN.pth`` (one file per model-parallel rank) + ``tokenizer.model``.
HF:   ``config.json`` + ``model.safetensors`` or ``model-0000k-of-0000n.safetensors`` with
      ``model.safetensors.index.json`` (+ ``tokenizer.json``).

Loading is strict: a key the model does not know, or a parameter the checkpoint lacks, is an error
that names them. Weights are loaded with ``weights_only=True`` / safetensors, never pickle code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from common.config import CheckpointError, dataclass_from_dict
from common.rope import rope_frequencies
from adapters.llama import Llama, LlamaConfig


# ----------------------------------------------------------------------------------------------
# Configs: Meta's params.json and HF's config.json are read through typed views (dataclasses named after
# their keys), so types and bounds are checked by the one strict reader before anything is built.


@dataclass(frozen=True)
class MetaParams:
    """The keys of a Llama 3 / 3.2 Vision ``params.json`` (llama-models' ``ModelArgs``), with their types."""

    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    n_kv_heads: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = False
    rope_scaling_factor: float = 8.0  # 3.1 uses 8; 3.2 1B/3B record their own factor
    rope_high_freq_factor: float = 4.0
    max_seq_len: int | None = None
    # The vision side of a Llama 3.2 Vision params.json; read by ``adapters.mllama_meta``.
    vision_chunk_size: int | None = None
    vision_max_num_chunks: int | None = None
    vision_num_cross_attention_layers: int | None = None


@dataclass(frozen=True)
class HFLlamaFields:
    """The keys of an HF ``LlamaConfig`` that decide the model. HF configs carry many more (token ids,
    ``torch_dtype``, ``transformers_version``...) that do not: those are not read."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    model_type: str = "llama"
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False


@dataclass(frozen=True)
class HFRopeScaling:
    """HF's ``rope_scaling`` object for ``rope_type: llama3`` (older files spell the key ``type``)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int
    rope_type: str | None = None
    type: str | None = None


def meta_ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward sizing rule: 8B (4096, 1024, 1.3) -> 14336."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def read_meta_params(params: Any, source: str = "params.json") -> MetaParams:
    """``params.json`` as a `MetaParams`: unknown keys, wrong types and bounds are CheckpointErrors."""
    return dataclass_from_dict(MetaParams, params, source)


def config_from_meta_params(params: Any, source: str = "params.json") -> LlamaConfig:
    p = read_meta_params(params, source)
    scaling = None
    if p.use_scaled_rope:
        scaling = {"factor": p.rope_scaling_factor, "high_freq_factor": p.rope_high_freq_factor}
    lm = {"dim": p.dim, "n_layers": p.n_layers, "n_heads": p.n_heads, "n_kv_heads": p.n_kv_heads or p.n_heads,
          "ffn_dim": meta_ffn_dim(p.dim, p.multiple_of, p.ffn_dim_multiplier), "vocab_size": p.vocab_size,
          "norm_eps": p.norm_eps, "rope_theta": p.rope_theta, "rope_scaling": scaling,
          "max_seq_len": p.max_seq_len or (131072 if scaling else 8192)}
    return dataclass_from_dict(LlamaConfig, lm, source)


def config_from_hf(config: Any, source: str = "config.json") -> LlamaConfig:
    """Read an HF ``LlamaConfig`` dict. Architectures other than plain Llama are refused by name."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: expected an object, got {type(config).__name__}")
    names = {f.name for f in fields(HFLlamaFields)}
    c = dataclass_from_dict(HFLlamaFields, {k: v for k, v in config.items() if k in names}, source)
    if c.model_type != "llama":
        raise CheckpointError(f"{source}: model_type {c.model_type!r} is not 'llama'")
    scaling = None
    if c.rope_scaling is not None:
        kind = c.rope_scaling.get("rope_type", c.rope_scaling.get("type"))
        if kind != "llama3":
            raise CheckpointError(f"{source}: rope_scaling type {kind!r} is not supported (only 'llama3')")
        s = dataclass_from_dict(HFRopeScaling, c.rope_scaling, source, key="rope_scaling")
        scaling = {"factor": s.factor, "low_freq_factor": s.low_freq_factor,
                   "high_freq_factor": s.high_freq_factor,
                   "original_max_position_embeddings": s.original_max_position_embeddings}
    head_dim = c.head_dim or c.hidden_size // c.num_attention_heads
    if head_dim != c.hidden_size // c.num_attention_heads:
        raise CheckpointError(f"{source}: head_dim {head_dim} != hidden_size/num_attention_heads")
    if c.attention_bias or c.mlp_bias:
        raise CheckpointError(f"{source}: attention_bias/mlp_bias are not part of Llama 3")
    lm = {"dim": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
          "n_kv_heads": c.num_key_value_heads or c.num_attention_heads, "ffn_dim": c.intermediate_size,
          "vocab_size": c.vocab_size, "norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
          "rope_scaling": scaling, "max_seq_len": c.max_position_embeddings,
          "tie_embeddings": c.tie_word_embeddings}
    return dataclass_from_dict(LlamaConfig, lm, source)


# ----------------------------------------------------------------------------------------------
# Hugging Face <-> Meta key mapping


def hf_to_meta_rope(w: Tensor, n_heads: int) -> Tensor:
    """Undo HF's q/k permutation (rotate-half layout -> Meta's interleaved pairs)."""
    out_dim, in_dim = w.shape
    hd = out_dim // n_heads
    return w.view(n_heads, 2, hd // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def meta_to_hf_rope(w: Tensor, n_heads: int) -> Tensor:
    """Meta's interleaved q/k rows -> HF's rotate-half layout (as transformers' converter does)."""
    out_dim, in_dim = w.shape
    hd = out_dim // n_heads
    return w.view(n_heads, hd // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


_HF_LAYER = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_HF_TOP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
           "lm_head.weight": "output.weight"}
_HF_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def hf_to_meta_state_dict(sd: dict[str, Tensor], cfg: LlamaConfig, source: str = "checkpoint") -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in sd.items():
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
            continue
        m = _HF_LAYER_RE.match(key)
        if m and m.group(2) in _HF_LAYER:
            new = f"layers.{m.group(1)}.{_HF_LAYER[m.group(2)]}"
            if new.endswith("attention.wq.weight"):
                value = hf_to_meta_rope(value, cfg.n_heads)
            elif new.endswith("attention.wk.weight"):
                value = hf_to_meta_rope(value, cfg.n_kv_heads)
            out[new] = value
        elif key.endswith("rotary_emb.inv_freq"):
            continue  # a derived buffer some old exports carry
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{source}: unknown keys {unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
    if cfg.tie_embeddings:
        out.pop("output.weight", None)
    return out


def meta_to_hf_state_dict(sd: dict[str, Tensor], cfg: LlamaConfig) -> dict[str, Tensor]:
    inverse_top = {v: k for k, v in _HF_TOP.items()}
    inverse_layer = {v: k for k, v in _HF_LAYER.items()}
    out = {}
    for key, value in sd.items():
        if key in inverse_top:
            out[inverse_top[key]] = value
            continue
        i, rest = key.split(".", 2)[1], key.split(".", 2)[2]
        if rest == "attention.wq.weight":
            value = meta_to_hf_rope(value, cfg.n_heads)
        elif rest == "attention.wk.weight":
            value = meta_to_hf_rope(value, cfg.n_kv_heads)
        out[f"model.layers.{i}.{inverse_layer[rest]}"] = value
    return out


# ----------------------------------------------------------------------------------------------
# Meta model-parallel shards

# Column-parallel weights are split along the output rows, row-parallel ones along the input columns;
# Llama 3's VocabParallelEmbedding splits the vocabulary (dim 0). Norms are replicated.
_ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")
_REPLICATED = ("norm.weight",)


def _meta_shard_dim(key: str) -> int | None:
    if key.endswith(_REPLICATED):
        return None
    if key.endswith(_ROW_PARALLEL):
        return 1
    return 0


def merge_meta_shards(shards: list[dict[str, Tensor]], files: list[Path]) -> dict[str, Tensor]:
    """Concatenate model-parallel shards along the dimension each layer was split on."""
    keys = set(shards[0])
    for f, s in zip(files[1:], shards[1:]):
        if set(s) != keys:
            diff = sorted(keys.symmetric_difference(s))
            raise CheckpointError(f"{f}: keys differ from {files[0].name}: {diff[:10]}")
    merged = {}
    for key in shards[0]:
        dim = _meta_shard_dim(key)
        parts = [s[key] for s in shards]
        merged[key] = parts[0] if dim is None or len(parts) == 1 else torch.cat(parts, dim=dim)
    return merged


def split_meta_shards(sd: dict[str, Tensor], n_shards: int) -> list[dict[str, Tensor]]:
    """The inverse of ``merge_meta_shards`` (used to write Meta-layout checkpoints)."""
    shards: list[dict[str, Tensor]] = [{} for _ in range(n_shards)]
    for key, value in sd.items():
        dim = _meta_shard_dim(key)
        parts = [value] * n_shards if dim is None else list(value.chunk(n_shards, dim=dim))
        if dim is not None and value.shape[dim] % n_shards:
            raise CheckpointError(f"{key}: dim {dim} of size {value.shape[dim]} does not split into {n_shards}")
        for shard, part in zip(shards, parts):
            shard[key] = part.clone()
    return shards


# ----------------------------------------------------------------------------------------------
# Reading files


def read_safetensors_file(f: Path) -> dict[str, Tensor]:
    """One safetensors file; a missing or unreadable one is a CheckpointError naming it."""
    from safetensors.torch import load_file

    if not f.is_file():
        raise CheckpointError(f"{f}: not found")
    try:
        return load_file(str(f))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{f}: cannot read safetensors ({e})") from e


def index_shard_names(index: Path) -> tuple[dict, list[str]]:
    """The weight map of ``model.safetensors.index.json`` and its shard file names. A name that is not a
    plain file name in the checkpoint folder (``../outside.safetensors``, an absolute path, a
    subfolder) is refused: the index must not make us read files outside the checkpoint."""
    meta = read_json(index)
    weight_map = meta.get("weight_map") if isinstance(meta, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: no 'weight_map' object")
    names = sorted(set(weight_map.values()), key=str)
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(f"{index}: shard file {name!r} is not a file name inside {index.parent}")
    return weight_map, names


def read_safetensors_dir(path: Path) -> dict[str, Tensor]:
    """All tensors of an HF directory: a single ``*.safetensors`` file or an indexed set of shards."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map, files = index_shard_names(index)
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files")
    sd: dict[str, Tensor] = {}
    for name in files:
        f = path / name
        if not f.exists():
            raise CheckpointError(f"{f}: listed in model.safetensors.index.json but missing")
        part = read_safetensors_file(f)
        dup = set(part) & set(sd)
        if dup:
            raise CheckpointError(f"{f}: keys already loaded from another shard: {sorted(dup)[:5]}")
        sd.update(part)
    if index.exists():
        missing = set(weight_map) - set(sd)
        if missing:
            raise CheckpointError(f"{index}: keys in the index but in no shard: {sorted(missing)[:10]}")
    return sd


def read_json(path: Path) -> dict:
    """A JSON config file; a missing or malformed one is a CheckpointError naming it."""
    if not path.is_file():
        raise CheckpointError(f"{path}: not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def load_meta_shards(path: Path) -> tuple[list[Path], list[dict[str, Tensor]]]:
    """``consolidated.pth`` or ``consolidated.NN.pth`` files of a Meta directory, read with weights_only."""
    files = sorted(path.glob("consolidated*.pth"))
    if not files:
        raise CheckpointError(f"{path}: no consolidated*.pth files next to params.json")
    shards = []
    for f in files:
        try:
            shards.append(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:  # torch raises several error types for bad files
            raise CheckpointError(f"{f}: cannot load with weights_only=True ({e})") from e
    return files, shards


def read_meta_dir(path: Path) -> tuple[dict, dict[str, Tensor]]:
    """params.json and the merged ``consolidated*.pth`` shards of a Meta checkpoint directory."""
    params = read_json(path / "params.json")
    files, shards = load_meta_shards(path)
    sd = merge_meta_shards(shards, files)
    sd.pop("rope.freqs", None)  # derived RoPE table stored by some Meta checkpoints
    return params, sd


def detect_layout(path: Path) -> str:
    if (path / "params.json").exists():
        return "meta"
    if (path / "config.json").exists():
        return "hf"
    raise CheckpointError(f"{path}: neither params.json (Meta layout) nor config.json (HF layout) found")


# ----------------------------------------------------------------------------------------------
# Building the model


def check_dtypes(model: torch.nn.Module, sd: dict[str, Tensor], source: str) -> None:
    """Every tensor is a float where the model holds a float, and all float tensors share one dtype: an
    fp16 tensor among fp32 ones would load (``assign=True`` keeps its dtype) and fail later, at inference."""
    expected = model.state_dict()
    float_dtypes: dict[torch.dtype, str] = {}
    for key, value in sd.items():
        want = expected[key].dtype
        kind_differs = want.is_floating_point != value.dtype.is_floating_point
        if kind_differs or (not want.is_floating_point and value.dtype != want):
            raise CheckpointError(f"{source}: {key} has dtype {value.dtype}, the model expects {want}")
        if value.dtype.is_floating_point:
            float_dtypes.setdefault(value.dtype, key)
    if len(float_dtypes) > 1:
        seen = ", ".join(f"{dt} ({key}, ...)" for dt, key in float_dtypes.items())
        raise CheckpointError(f"{source}: tensors of several float dtypes: {seen}; a model has one dtype")


def load_state_dict_strict(model: torch.nn.Module, sd: dict[str, Tensor], source: str) -> None:
    """load_state_dict(strict) with an error that lists the unknown and missing keys by name, and refuses
    a tensor of the wrong shape or dtype (`check_dtypes`)."""
    expected = model.state_dict()
    unknown, missing = sorted(set(sd) - set(expected)), sorted(set(expected) - set(sd))
    if unknown or missing:
        raise CheckpointError(f"{source}: unknown keys {unknown[:10]}; missing keys {missing[:10]}")
    for key, value in sd.items():
        want = expected[key].shape
        if value.shape != want:
            raise CheckpointError(f"{source}: {key} has shape {tuple(value.shape)}, model expects {tuple(want)}")
    check_dtypes(model, sd, source)
    model.load_state_dict(sd, strict=True, assign=True)


def cast_floats(sd: dict[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    """Float tensors cast to ``dtype`` (None: as stored); other tensors are left for `check_dtypes`."""
    if dtype is None:
        return sd
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def llama_from_state_dict(cfg: LlamaConfig, sd: dict[str, Tensor], source: str, dtype=None) -> Llama:
    with torch.device("meta"):
        model = Llama(cfg)
    sd = cast_floats(sd, dtype)
    if cfg.tie_embeddings:
        # One tensor under both names (the model's state dict lists it twice); checkpoints that store
        # ``lm_head.weight`` anyway had it dropped by ``hf_to_meta_state_dict``.
        sd = dict(sd)
        if "tok_embeddings.weight" in sd:
            sd["output.weight"] = sd["tok_embeddings.weight"]
    load_state_dict_strict(model, sd, source)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    # Non-persistent buffer: recompute on the weights' device.
    model.inv_freq = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(
        model.tok_embeddings.weight.device
    )
    return model


def load_llama(path: str | Path, dtype: torch.dtype | None = None) -> Llama:
    """Load a Llama 3 / 3.1 checkpoint directory in Meta's or HF's layout (detected from its files)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    if detect_layout(path) == "meta":
        params, sd = read_meta_dir(path)
        cfg = config_from_meta_params(params, str(path / "params.json"))
        return llama_from_state_dict(cfg, sd, str(path), dtype)
    cfg = config_from_hf(read_json(path / "config.json"), str(path / "config.json"))
    sd = hf_to_meta_state_dict(read_safetensors_dir(path), cfg, str(path))
    return llama_from_state_dict(cfg, sd, str(path), dtype)


def save_meta_checkpoint(model: Llama, path: str | Path, n_shards: int = 1) -> Path:
    """Write ``params.json`` + ``consolidated.NN.pth`` (model-parallel shards), Meta's layout."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    # params.json has no ffn_dim field: express it exactly through Meta's sizing rule (multiple_of 1).
    base = int(2 * (4 * cfg.dim) / 3)
    multiplier = (cfg.ffn_dim + 0.5) / base
    assert meta_ffn_dim(cfg.dim, 1, multiplier) == cfg.ffn_dim
    params = {
        "dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
        "vocab_size": cfg.vocab_size, "multiple_of": 1, "ffn_dim_multiplier": multiplier,
        "norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "use_scaled_rope": cfg.rope_scaling is not None,
        "max_seq_len": cfg.max_seq_len,  # ModelArgs' field: without it the context reads back as 8K or 128K
    }
    if cfg.rope_scaling is not None:
        if (cfg.rope_scaling.low_freq_factor, cfg.rope_scaling.original_max_position_embeddings) != (1.0, 8192):
            raise CheckpointError("Meta's params.json cannot express low_freq_factor != 1 or original context != 8192")
        params["rope_scaling_factor"] = cfg.rope_scaling.factor
        params["rope_high_freq_factor"] = cfg.rope_scaling.high_freq_factor
    if cfg.tie_embeddings:
        raise CheckpointError("Meta's layout has no tied embeddings; save this model in the HF layout")
    (path / "params.json").write_text(json.dumps(params, indent=2))
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for i, shard in enumerate(split_meta_shards(sd, n_shards)):
        torch.save(shard, path / f"consolidated.{i:02d}.pth")
    return path
