"""Our own image/video checkpoint: the ``multimodal`` kind of `common.export` (``config.json`` +
``model.safetensors`` + ``tokenizer.model``), and the loading steps every model around a frozen LM shares
(`lm_model_state_dict`, `load_lm_model`: the speech model's export uses them too).

With ``lm_path`` the frozen LM is not copied (it is bitwise the checkpoint it came from): the
directory then holds the adapter, encoder and projector only, and records where the LM lives in a
way that survives moving the export: the absolute path, the path relative to the export, and a
fingerprint of the LM (`lm_fingerprint`). Loading tries an explicit ``lm_path`` (``--lm``) alone, else
the absolute then the relative path, and takes the first LM whose config and fingerprint match. SFT swaps
the LM on purpose (``swap_lm``): another LM of the same config, any weights, in place of the export's.

A pipeline / tensor-parallel run writes the weights sharded, each rank its own part (`save_shard`), as
Hugging Face does: ``model-0000i-of-0000n.safetensors`` files and ``model.safetensors.index.json``
(``{"metadata": {...}, "weight_map": {name: file}}``), with the same ``config.json`` (`write_shard_index`,
written last). `load_checkpoint` reads either layout into one process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from adapters.checkpoint import (CheckpointError, LlamaCheckpoint, cast_floats, load_llama, load_state_dict_strict,
                                 read_json)
from adapters.llama import Llama, LlamaConfig
from adapters.multimodal import MultimodalConfig, MultimodalLlama
from common.config import config_to_dict
from common.export import (CONFIG, TOKENIZER, WEIGHTS, ExportFormatError, export_format, read_export,
                           read_export_meta, write_atomic, write_export)
from common.rope import rope_frequencies
from vision.encoder import VisionEncoderConfig


class LMMismatchError(CheckpointError):
    """An export's frozen LM cannot be found, or the one found is not the one it was trained with."""

KIND = "multimodal"  # the image and video models' export kind (`common.export`)
# Top-level keys of our config.json beside format and config. ``lm_path`` (absolute), ``lm_path_relative``
# (from the export directory) and ``lm_fingerprint`` are set when the frozen LM is not copied into the export.
EXTRA_KEYS = ("encoder_initialised_from", "lm_path", "lm_path_relative", "lm_fingerprint")


def lm_model_state_dict(model: nn.Module, with_lm: bool = True) -> dict[str, torch.Tensor]:
    """The state dict of a model around a frozen ``model.lm`` as an export stores it: without ``lm.*`` when
    ``with_lm`` is False, and a tied output matrix once (safetensors refuses shared tensors)."""
    sd = model.state_dict()
    if not with_lm:
        return {k: v for k, v in sd.items() if not k.startswith("lm.")}
    if model.lm.cfg.tie_embeddings:
        sd.pop("lm.output.weight")
    return sd


def load_lm_model(model_cls: type, cfg: Any, sd: dict[str, torch.Tensor], source: str,
                  dtype: torch.dtype | None = None) -> nn.Module:
    """``model_cls(cfg, Llama(cfg.lm))`` built on the meta device and loaded strictly from ``sd`` (the image
    and speech models alike): a tied output matrix restored, the RoPE buffer (not saved) rebuilt, the LM
    frozen. Float tensors are cast to ``dtype`` when given."""
    with torch.device("meta"):
        model = model_cls(cfg, Llama(cfg.lm))
    tied = cfg.lm.tie_embeddings
    if tied and "lm.tok_embeddings.weight" in sd:
        sd = {**sd, "lm.output.weight": sd["lm.tok_embeddings.weight"]}
    load_state_dict_strict(model, cast_floats(sd, dtype), source)
    if tied:
        model.lm.output.weight = model.lm.tok_embeddings.weight
    model.lm.inv_freq = rope_frequencies(cfg.lm.head_dim, cfg.lm.rope_theta, cfg.lm.rope_scaling)
    model.lm.freeze()
    return model


def export_meta(cfg: MultimodalConfig, out_dir: str | Path, lm_path: str | None,
                fingerprint: Callable[[], str]) -> tuple[MultimodalConfig, dict]:
    """(config, extra config.json keys) of an export of a model of ``cfg``: the encoder's initial ``pretrained``
    source kept as provenance only (its weights are in the export: loading must not need that file or tag
    again), and with ``lm_path`` where the LM lives (`lm_record`; ``fingerprint()`` computes its fingerprint)."""
    extra = {"encoder_initialised_from": cfg.vision.pretrained, **lm_record(lm_path, Path(out_dir), fingerprint)}
    return dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, pretrained=None)), extra


def save_checkpoint(
    model: MultimodalLlama, out_dir: str | Path, tokenizer_path: str | Path | None = None, lm_path: str | None = None
) -> Path:
    """Write the export. With ``lm_path`` (the directory ``model.lm`` was loaded from, relative to the
    current directory) the LM is not copied: its absolute path, its path relative to ``out_dir`` and
    its fingerprint (`lm_fingerprint`) are recorded so the export loads from anywhere (`resolve_lm`)."""
    cfg, extra = export_meta(model.cfg, out_dir, lm_path, lambda: lm_fingerprint(model.lm))
    sd = lm_model_state_dict(model, with_lm=lm_path is None)
    return write_export(out_dir, KIND, cfg, sd, tokenizer_path, extra)


# ----------------------------------------------------------------------------------------------
# The sharded layout (one file per writing rank)


INDEX = "model.safetensors.index.json"  # Hugging Face's name and layout


def shard_file(i: int, n: int) -> str:
    """File name of shard ``i`` (0-based) of ``n``: ``model-00001-of-00004.safetensors`` (HF's names)."""
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def begin_sharded_export(out_dir: str | Path) -> Path:
    """Make ``out_dir`` no export (``config.json`` removed first, as `common.export` does) and remove the
    weights of an earlier export there (single file, index, shards), before the ranks write their shards."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG).unlink(missing_ok=True)
    for old in (out / INDEX, out / WEIGHTS, *out.glob("model-*-of-*.safetensors")):
        old.unlink(missing_ok=True)
    return out


def save_shard(tensors: dict[str, torch.Tensor], out_dir: str | Path, i: int, n: int) -> Path:
    """Write one rank's part of a sharded export (`shard_file` ``i`` of ``n``); returns the file."""
    dest = Path(out_dir) / shard_file(i, n)
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_atomic(dest, lambda tmp: save_file(cpu, str(tmp), metadata={"format": "pt"}))
    return dest


def write_shard_index(cfg: MultimodalConfig, out_dir: str | Path, weight_map: dict[str, str],
                      tokenizer_path: str | Path | None = None, lm_path: str | None = None,
                      fingerprint: Callable[[], str] | None = None) -> Path:
    """Finish a sharded export whose shards (`save_shard`) are on disk: the index of ``weight_map`` (name ->
    shard file), the tokenizer, and ``config.json`` last (what makes the directory an export). With
    ``lm_path`` the LM is referenced as `save_checkpoint` does; ``fingerprint()`` gives its fingerprint
    (`checkpoint_fingerprint` reads it from the checkpoint without loading the LM)."""
    out = Path(out_dir)
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not (out / f).is_file()]
    if missing:
        raise CheckpointError(f"{out}: shards {missing} of the index are not written")
    cfg, extra = export_meta(cfg, out, lm_path, fingerprint or (lambda: checkpoint_fingerprint(lm_path)))
    meta = json.dumps({"format": export_format(KIND), "config": config_to_dict(cfg), **extra}, indent=2)
    size = sum((out / f).stat().st_size for f in files)
    index = json.dumps({"metadata": {"format": export_format(KIND), "total_size": size},
                        "weight_map": dict(sorted(weight_map.items()))}, indent=1)
    write_atomic(out / INDEX, lambda tmp: tmp.write_text(index))
    if tokenizer_path is not None:
        write_atomic(out / TOKENIZER, lambda tmp: shutil.copyfile(tokenizer_path, tmp))
    write_atomic(out / CONFIG, lambda tmp: tmp.write_text(meta))
    return out


def read_shards(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of a sharded export: every file of the index's ``weight_map`` read, each holding exactly
    the names the index gives it (`ExportFormatError` naming the index, the file and the names otherwise)."""
    index_file = path / INDEX
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportFormatError(f"{index_file}: not valid JSON ({e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ExportFormatError(f"{index_file}: expected {{'metadata': {{...}}, 'weight_map': {{name: file}}}}")
    by_file: dict[str, set[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, set()).add(name)
    sd: dict[str, torch.Tensor] = {}
    for file, names in sorted(by_file.items()):
        shard = path / file
        if Path(file).name != file or not shard.is_file():
            raise ExportFormatError(f"{index_file}: shard {file!r} is not a file of {path}")
        try:
            tensors = load_file(str(shard))
        except Exception as e:  # safetensors raises its own error types
            raise ExportFormatError(f"{shard}: cannot read safetensors ({e})") from None
        if set(tensors) != names:
            lacks, extra = sorted(names - set(tensors)), sorted(set(tensors) - names)
            raise ExportFormatError(f"{shard}: does not hold what {index_file.name} maps to it (lacks "
                                    f"{lacks[:4]}, has unlisted {extra[:4]})")
        sd.update(tensors)
    return sd


def read_multimodal_export(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, state dict) of our export in either layout: ``model.safetensors`` or sharded (`INDEX`)."""
    if not (path / INDEX).is_file():
        _, meta, sd = read_export(path, (KIND,), EXTRA_KEYS, MultimodalConfig)
        return meta, sd
    _, meta = read_export_meta(path, (KIND,), EXTRA_KEYS, MultimodalConfig)
    return meta, read_shards(path)


def load_checkpoint(path: str | Path, dtype: torch.dtype | None = None, lm_path: str | Path | None = None,
                    swap_lm: bool = False) -> MultimodalLlama:
    """Load our export. ``lm_path`` overrides where an export without its LM looks for it (`resolve_lm`);
    with ``swap_lm`` it is another LM of the same config put in place of the export's (`swapped_lm`), held
    or referenced, every other weight unchanged. With ``dtype`` None the model keeps the dtype of the
    export's own weights (a separate LM is cast to it: one dtype per model); a tensor in another float dtype
    among them is refused (`check_dtypes`). Single-file and sharded exports alike (`read_multimodal_export`)."""
    path = Path(path)
    cfg_file = path / "config.json"
    meta, sd = read_multimodal_export(path)
    cfg = meta["config"]
    check_lm_keys(meta, cfg_file)
    holds_lm = not meta.get("lm_path")
    if holds_lm and lm_path is not None and not swap_lm:
        raise CheckpointError(f"{cfg_file}: this export holds its LM; --lm/lm_path is for exports without one")
    if swap_lm or not holds_lm:
        lm = swapped_lm(lm_path, cfg.lm, cfg_file) if swap_lm else resolve_lm(meta, cfg.lm, cfg_file, lm_path)
        sd = {k: v for k, v in sd.items() if not k.startswith("lm.")}
        own_dtype = dtype or next((v.dtype for v in sd.values() if v.is_floating_point()), None)
        sd.update({f"lm.{k}": v for k, v in cast_floats(lm.state_dict(), own_dtype).items()})
    return load_lm_model(MultimodalLlama, cfg, sd, str(path), dtype)


def read_multimodal_meta(path: str | Path) -> dict:
    """config.json of our image/video export at ``path``, checked (`read_export_meta`, `check_lm_keys`)."""
    _, meta = read_export_meta(path, (KIND,), EXTRA_KEYS)
    check_lm_keys(meta, Path(path) / "config.json")
    return meta


def check_lm_keys(meta: dict, cfg_file: Path) -> None:
    """The keys that say where the LM lives are strings when set."""
    for key in ("lm_path", "lm_path_relative", "lm_fingerprint"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise CheckpointError(f"{cfg_file}: {key} must be a string, got {meta[key]!r}")


# ----------------------------------------------------------------------------------------------
# Where an export's frozen LM lives


FINGERPRINT_SAMPLE = 64  # leading values of every tensor hashed into the fingerprint


def lm_fingerprint(lm: Llama) -> str:
    """sha256 of the LM's config, its sorted (name, shape) and the first `FINGERPRINT_SAMPLE` values of
    every tensor: the config and shapes tell sizes apart, the sampled values a base model from its instruct
    sibling of the same size (every tensor differs, no shape does), without hashing GBs. The values are
    hashed as float64, so the dtype in memory does not count: a bf16 LM on disk and the float32 copy the
    trainer exports from (every bf16 value is exact in float32) give one fingerprint."""
    return _fingerprint(lm, legacy=False)


def checkpoint_fingerprint(path: str | Path) -> str:
    """`lm_fingerprint` of the LM checkpoint at ``path`` read through `LlamaCheckpoint`: the leading rows of
    each tensor only, never the whole LM (what a pipeline / tensor-parallel export records)."""
    ckpt = LlamaCheckpoint(path)
    with torch.device("meta"):
        shapes = {k: list(v.shape) for k, v in Llama(ckpt.cfg).state_dict().items()}

    def sample(name: str) -> torch.Tensor:
        if name not in ckpt.keys() and name == "output.weight" and ckpt.cfg.tie_embeddings:
            name = "tok_embeddings.weight"  # a tied head is the embedding matrix
        shape = shapes[name]
        rows = -(-FINGERPRINT_SAMPLE // max(1, int(torch.Size(shape[1:]).numel())))
        return ckpt.read(name, 0, 0, min(rows, shape[0])).flatten()

    return _digest(ckpt.cfg, shapes, sample)


def _digest(cfg: LlamaConfig, shapes: dict[str, list[int]], sample: Callable[[str], torch.Tensor],
            dtypes: dict[str, str] | None = None) -> str:
    """sha256 of (config, sorted names and shapes [and dtypes]) and the first values of each tensor
    (``sample(name)``, flattened); ``dtypes`` given: the legacy form (below), values hashed in their own dtype."""
    tensors = sorted((k, v, *([dtypes[k]] if dtypes else [])) for k, v in shapes.items())
    digest = hashlib.sha256(json.dumps({"config": config_to_dict(cfg), "tensors": tensors}).encode())
    for name, *_ in tensors:
        values = sample(name)[:FINGERPRINT_SAMPLE].cpu()
        digest.update((values if dtypes else values.to(torch.float64)).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _fingerprint(lm: Llama, legacy: bool) -> str:
    # legacy: the form exports recorded before 2026-12-03 (dtypes listed, values in their own dtype), still
    # accepted when loading so that those exports keep finding their LM
    sd = lm.state_dict()
    return _digest(lm.cfg, {k: list(v.shape) for k, v in sd.items()}, lambda k: sd[k].detach().flatten(),
                   {k: str(v.dtype) for k, v in sd.items()} if legacy else None)


def lm_record(lm_path: str | Path | None, out_dir: Path, fingerprint: Callable[[], str]) -> dict:
    """The config.json keys that say where the LM of an export without its LM is (none with its LM)."""
    if lm_path is None:
        return {}
    absolute = Path(lm_path).resolve()
    return {"lm_path": str(absolute), "lm_path_relative": os.path.relpath(absolute, out_dir.resolve()),
            "lm_fingerprint": fingerprint()}


def lm_mismatch(lm: Llama, want: LlamaConfig, fingerprint: str | None) -> str | None:
    """What differs between ``lm`` and the LM an export recorded, or None when they match."""
    if lm.cfg != want:
        diff = [f"{f.name} {getattr(want, f.name)!r} (recorded) vs {getattr(lm.cfg, f.name)!r}"
                for f in dataclasses.fields(want) if getattr(want, f.name) != getattr(lm.cfg, f.name)]
        return "config differs: " + ", ".join(diff)
    if fingerprint is not None and fingerprint not in ((found := lm_fingerprint(lm)), _fingerprint(lm, legacy=True)):
        return (f"same config, but the tensor names, shapes or weights differ (fingerprint "
                f"{fingerprint[:12]}... recorded, {found[:12]}... found)")
    return None


def resolve_lm(meta: dict, want: LlamaConfig, cfg_file: Path, explicit: str | Path | None) -> Llama:
    """The export's LM: ``explicit`` alone when given, else the first of the recorded absolute and relative
    paths whose LM matches (`lm_mismatch`). Loaded as stored, in its own dtype."""
    if explicit is not None:
        candidates = [Path(explicit)]
    else:
        candidates = [Path(meta["lm_path"])]
        if meta.get("lm_path_relative"):
            candidates.append(cfg_file.parent / meta["lm_path_relative"])
    tried = []
    for cand in candidates:
        try:
            lm = load_llama(cand)
        except CheckpointError as e:
            tried.append(str(e))
            continue
        problem = lm_mismatch(lm, want, meta.get("lm_fingerprint"))
        if problem is None:
            return lm
        tried.append(f"{cand}: {problem}")
    raise LMMismatchError(f"{cfg_file}: no usable LM ({'; '.join(tried)}); pass --lm PATH (lm_path=) "
                          f"pointing to the LM this export was trained with")


def swapped_lm(lm_path: str | Path | None, want: LlamaConfig, source: str | Path) -> Llama:
    """The LM at ``lm_path`` to replace an export's (the paper's SFT hot-swaps the pre-trained LM for the
    instruction-tuned one, sec. 7.5): any weights, but its config must equal ``want``, the recorded one
    (every size and the vocabulary, so the adapters fit it unchanged), else `LMMismatchError` naming the
    fields."""
    if lm_path is None:
        raise CheckpointError(f"{source}: swapping the LM needs the path of the LM to swap in (model.lm)")
    lm = load_llama(lm_path)
    if lm.cfg != want:
        raise LMMismatchError(f"{source}: the LM {lm_path} cannot replace the export's: "
                              f"{lm_mismatch(lm, want, None)}; a swapped LM keeps every size and the vocabulary")
    return lm


def load_multimodal_checkpoint(
    path: str | Path, dtype: torch.dtype | None = None, vision_config: VisionEncoderConfig | None = None,
    lm_path: str | Path | None = None,
) -> MultimodalLlama:
    """Load a multimodal checkpoint in any layout we read, chosen by its files: Meta (params.json),
    HF Mllama (config.json with model_type 'mllama') or our own (config.json from ``adapters.model_io``).
    ``lm_path`` is for our exports without their LM (`load_checkpoint`)."""
    from adapters.mllama import load_mllama  # these import this module's siblings; keep import time low
    from adapters.mllama_meta import load_meta_vision

    path = Path(path)
    if lm_path is not None and (path / "params.json").exists():
        raise CheckpointError(f"{path}: lm_path (--lm) is for our exports; Meta's layout holds its LM")
    if (path / "params.json").exists():
        return load_meta_vision(path, dtype, vision_config)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: neither params.json (Meta layout) nor config.json (HF or ours) found")
    if vision_config is not None:
        raise CheckpointError(f"{path}: vision_config is for Meta's layout only; config.json has the sizes")
    config = read_json(cfg_file)
    if isinstance(config, dict) and config.get("model_type") == "mllama":
        if lm_path is not None:
            raise CheckpointError(f"{path}: lm_path (--lm) is for our exports; an HF Mllama directory "
                                  f"holds its LM")
        return load_mllama(path, dtype)
    return load_checkpoint(path, dtype, lm_path)  # anything else: an ExportFormatError naming both formats
