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


def hf_key_map(keys, source: str = "checkpoint") -> dict[str, tuple[str, str | None]]:
    """Meta name -> (HF key, the config field giving the head count whose q/k rows HF permuted, or None) for
    HF ``keys``; derived buffers are skipped, an unknown key is a CheckpointError naming it."""
    out: dict[str, tuple[str, str | None]] = {}
    unknown = []
    for key in keys:
        m = _HF_LAYER_RE.match(key)
        if key in _HF_TOP:
            out[_HF_TOP[key]] = (key, None)
        elif m and m.group(2) in _HF_LAYER:
            rest = _HF_LAYER[m.group(2)]
            heads = {"attention.wq.weight": "n_heads", "attention.wk.weight": "n_kv_heads"}.get(rest)
            out[f"layers.{m.group(1)}.{rest}"] = (key, heads)
        elif not key.endswith("rotary_emb.inv_freq"):  # a derived buffer some old exports carry
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{source}: unknown keys {unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
    return out


def hf_to_meta_state_dict(sd: dict[str, Tensor], cfg: LlamaConfig, source: str = "checkpoint") -> dict[str, Tensor]:
    out = {name: hf_to_meta_rope(sd[key], getattr(cfg, heads)) if heads else sd[key]
           for name, (key, heads) in hf_key_map(sd, source).items()}
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


def split_meta_shards(sd: dict[str, Tensor], n_shards: int) -> list[dict[str, Tensor]]:
    """The inverse of `MetaShardFiles` reading every key (used to write Meta-layout checkpoints)."""
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
# Reading files. Nothing is read until asked for: keys, shapes and dtypes come from safetensors headers or
# from memory-mapped ``weights_only`` pickles, and `parts` gives one tensor or one slice ``[start, stop)`` of
# it along ``dim`` as views onto the mapped files (several, concatenated along a dim, where Meta's shards
# split it); `join_parts` makes one tensor of them, copying each byte once at most (into ``out`` when given).
# The whole-directory readers read every key through the same objects.


def join_parts(parts: tuple[list[Tensor], int], out: Tensor | None = None) -> Tensor:
    """``(views, dim)`` as one tensor: the single view itself, or their concatenation; into ``out`` when given."""
    views, d = parts
    if out is None:
        return views[0] if len(views) == 1 else torch.cat(views, dim=d)
    offset = 0
    for v in views:
        out.narrow(d, offset, v.shape[d]).copy_(v)
        offset += v.shape[d]
    return out


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


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


class SafetensorsFiles:
    """The tensors of an HF directory (one ``*.safetensors`` file, or the shards its index names), opened
    with ``safe_open``: a key listed twice, a listed file that is missing or unreadable, and an index key
    in no shard are CheckpointErrors naming them."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map, files = index_shard_names(index)
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path}: no *.safetensors files")
        self._where: dict[str, Any] = {}  # key -> its file's open handle
        for name in files:
            f = path / name
            if not f.is_file():
                raise CheckpointError(f"{f}: listed in model.safetensors.index.json but missing")
            try:
                handle = safe_open(str(f), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{f}: cannot read safetensors ({e})") from e
            dup = set(handle.keys()) & set(self._where)
            if dup:
                raise CheckpointError(f"{f}: keys already loaded from another shard: {sorted(dup)[:5]}")
            self._where.update(dict.fromkeys(handle.keys(), handle))
        if index.exists():
            missing = set(weight_map) - set(self._where)
            if missing:
                raise CheckpointError(f"{index}: keys in the index but in no shard: {sorted(missing)[:10]}")

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._where[key].get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        return _SAFETENSORS_DTYPES[self._where[key].get_slice(key).get_dtype()]

    def parts(self, key: str, dim: int | None = None, start: int = 0, stop: int = 0) -> tuple[list[Tensor], int]:
        if dim is None:
            return [self._where[key].get_tensor(key)], 0
        part = self._where[key].get_slice(key)
        index = [slice(None)] * len(part.get_shape())
        index[dim] = slice(start, stop)
        return [part[tuple(index)]], 0


def load_meta_shards(path: Path) -> tuple[list[Path], list[dict[str, Tensor]]]:
    """``consolidated.pth`` or ``consolidated.NN.pth`` files of a Meta directory, memory-mapped with weights_only."""
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


class MetaShardFiles:
    """Meta's model-parallel ``consolidated.NN.pth`` shards (`load_meta_shards`): a key is its parts
    concatenated along the dim its layer was split on (`_meta_shard_dim`; replicated keys are read from the
    first shard), so a slice along that dim reads only the shards it overlaps. Shards with different key sets
    are a CheckpointError."""

    def __init__(self, path: Path):
        self.files, self.shards = load_meta_shards(path)
        keys = set(self.shards[0])
        for f, s in zip(self.files[1:], self.shards[1:]):
            if set(s) != keys:
                diff = sorted(keys.symmetric_difference(s))
                raise CheckpointError(f"{f}: keys differ from {self.files[0].name}: {diff[:10]}")

    def keys(self) -> list[str]:
        return list(self.shards[0])

    def _split(self, key: str) -> int | None:
        return None if len(self.shards) == 1 else _meta_shard_dim(key)

    def shape(self, key: str) -> tuple[int, ...]:
        shape, d = list(self.shards[0][key].shape), self._split(key)
        if d is not None:
            shape[d] = sum(s[key].shape[d] for s in self.shards)
        return tuple(shape)

    def dtype(self, key: str) -> torch.dtype:
        return self.shards[0][key].dtype

    def parts(self, key: str, dim: int | None = None, start: int = 0, stop: int = 0) -> tuple[list[Tensor], int]:
        d = self._split(key)
        if d is None:
            t = self.shards[0][key]
            return [t if dim is None else t.narrow(dim, start, stop - start)], 0
        parts, offset = [], 0
        for s in self.shards:
            part, n = s[key], s[key].shape[d]
            if dim is None:
                parts.append(part)
            elif dim != d:
                parts.append(part.narrow(dim, start, stop - start))
            elif max(start, offset) < min(stop, offset + n):
                lo, hi = max(start, offset), min(stop, offset + n)
                parts.append(part.narrow(d, lo - offset, hi - lo))
            offset += n
        return parts, d


def read_safetensors_dir(path: Path) -> dict[str, Tensor]:
    """All tensors of an HF directory: a single ``*.safetensors`` file or an indexed set of shards."""
    files = SafetensorsFiles(path)
    return {key: join_parts(files.parts(key)) for key in files.keys()}


def read_json(path: Path) -> dict:
    """A JSON config file; a missing or malformed one is a CheckpointError naming it."""
    if not path.is_file():
        raise CheckpointError(f"{path}: not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def detect_layout(path: Path) -> str:
    if (path / "params.json").exists():
        return "meta"
    if (path / "config.json").exists():
        return "hf"
    raise CheckpointError(f"{path}: neither params.json (Meta layout) nor config.json (HF layout) found")


class LlamaCheckpoint:
    """A Llama checkpoint directory in either layout, opened without reading its tensors, under the names
    ``Llama.state_dict()`` uses. `cfg`, `keys`, `shape` and `dtype` cost no tensor read; `read` returns one
    tensor, or its slice ``[start, stop)`` along ``dim``, in the stored dtype (bf16 stays bf16): a view onto
    the mapped file where one is stored whole, or copied once into ``out`` when given. HF q/k rows are
    un-permuted per head (`hf_to_meta_rope`), so a dim-0 slice reads the rows of the heads it covers only.
    Every read is recorded in `reads` as ``(key, dim, start, stop)``."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a directory")
        self.path, self.layout = path, detect_layout(path)
        self.reads: list[tuple[str, int | None, int, int]] = []
        self._source: dict[str, tuple[str, str | None]] = {}  # name -> (stored key, q/k head-count field)
        if self.layout == "meta":
            params = read_json(path / "params.json")
            self._files: MetaShardFiles | SafetensorsFiles = MetaShardFiles(path)
            self.cfg = config_from_meta_params(params, str(path / "params.json"))
            # rope.freqs: the derived RoPE table some Meta checkpoints store
            self._source = {k: (k, None) for k in self._files.keys() if k != "rope.freqs"}
            return
        self.cfg = config_from_hf(read_json(path / "config.json"), str(path / "config.json"))
        self._files = SafetensorsFiles(path)
        self._source = hf_key_map(self._files.keys(), str(path))
        if self.cfg.tie_embeddings:  # stored anyway by some exports; the model holds one matrix
            self._source.pop("output.weight", None)

    def keys(self) -> list[str]:
        return list(self._source)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._files.shape(self._source[key][0])

    def dtype(self, key: str) -> torch.dtype:
        return self._files.dtype(self._source[key][0])

    def read(self, key: str, dim: int | None = None, start: int = 0, stop: int = 0,
             out: Tensor | None = None) -> Tensor:
        stored, heads = self._source[key]
        if dim is not None:
            shape = self.shape(key)
            if not (0 <= dim < len(shape) and 0 <= start < stop <= shape[dim]):
                raise CheckpointError(f"{self.path}: {key} of shape {shape} has no slice [{start}, {stop}) "
                                      f"along dim {dim}")
        self.reads.append((key, dim, start, stop))
        if heads is None:
            return join_parts(self._files.parts(stored, dim, start, stop), out)
        n_heads = getattr(self.cfg, heads)
        if dim != 0:
            rows = hf_to_meta_rope(join_parts(self._files.parts(stored, dim, start, stop)), n_heads)
        else:
            hd = self.shape(key)[0] // n_heads
            first, last = start // hd, -(-stop // hd)  # the whole heads covering [start, stop)
            rows = hf_to_meta_rope(join_parts(self._files.parts(stored, 0, first * hd, last * hd)), last - first)
            rows = rows[start - first * hd : stop - first * hd]
        return rows if out is None else out.copy_(rows)


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
    ckpt = LlamaCheckpoint(path)
    return llama_from_state_dict(ckpt.cfg, {k: ckpt.read(k) for k in ckpt.keys()}, str(ckpt.path), dtype)


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


def save_hf_checkpoint(model: Llama, path: str | Path, n_files: int = 1) -> Path:
    """Write ``config.json`` + safetensors in HF's layout (q/k rows permuted as transformers' converter
    does); ``n_files`` > 1 spreads the tensors over ``model-0000k-of-0000n.safetensors`` with an index."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    config = {"model_type": "llama", "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
              "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
              "intermediate_size": cfg.ffn_dim, "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps,
              "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_seq_len,
              "tie_word_embeddings": cfg.tie_embeddings,
              "rope_scaling": None if cfg.rope_scaling is None else {"rope_type": "llama3",
                                                                     **asdict(cfg.rope_scaling)}}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        sd.pop("output.weight")  # one matrix, stored once
    sd = {k: v.contiguous() for k, v in meta_to_hf_state_dict(sd, cfg).items()}
    if n_files == 1:
        save_file(sd, str(path / "model.safetensors"))
        return path
    names = [f"model-{i + 1:05d}-of-{n_files:05d}.safetensors" for i in range(n_files)]
    weight_map = {key: names[i % n_files] for i, key in enumerate(sd)}
    for name in names:
        save_file({k: v for k, v in sd.items() if weight_map[k] == name}, str(path / name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=2))
    return path
