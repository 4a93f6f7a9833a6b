"""Our own image/video checkpoint: the ``multimodal`` kind of `common.export` (``config.json`` +
``model.safetensors`` + ``tokenizer.model``), and the loading steps every model around a frozen LM shares
(`lm_model_state_dict`, `load_lm_model`: the speech model's export uses them too).

With ``lm_path`` the frozen LM is not copied (it is bitwise the checkpoint it came from): the
directory then holds the adapter, encoder and projector only, and records where the LM lives in a
way that survives moving the export: the absolute path, the path relative to the export, and a
fingerprint of the LM (`lm_fingerprint`). Loading tries an explicit ``lm_path`` (``--lm``) alone, else
the absolute then the relative path, and takes the first LM whose config and fingerprint match. SFT swaps
the LM on purpose (``swap_lm``): another LM of the same config, any weights, in place of the export's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters.checkpoint import CheckpointError, cast_floats, load_llama, load_state_dict_strict, read_json
from adapters.llama import Llama, LlamaConfig
from adapters.multimodal import MultimodalConfig, MultimodalLlama
from common.config import config_to_dict
from common.export import read_export, read_export_meta, write_export
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


def save_checkpoint(
    model: MultimodalLlama, out_dir: str | Path, tokenizer_path: str | Path | None = None, lm_path: str | None = None
) -> Path:
    """Write the export. With ``lm_path`` (the directory ``model.lm`` was loaded from, relative to the
    current directory) the LM is not copied: its absolute path, its path relative to ``out_dir`` and
    its fingerprint (`lm_fingerprint`) are recorded so the export loads from anywhere (`resolve_lm`)."""
    # The encoder's weights are in this checkpoint: its initial ``pretrained`` source is provenance only
    # (loading must not need that file or tag again).
    cfg = dataclasses.replace(model.cfg, vision=dataclasses.replace(model.cfg.vision, pretrained=None))
    extra = {"encoder_initialised_from": model.cfg.vision.pretrained,
             **lm_record(model.lm, lm_path, Path(out_dir))}
    sd = lm_model_state_dict(model, with_lm=lm_path is None)
    return write_export(out_dir, KIND, cfg, sd, tokenizer_path, extra)


def load_checkpoint(path: str | Path, dtype: torch.dtype | None = None, lm_path: str | Path | None = None,
                    swap_lm: bool = False) -> MultimodalLlama:
    """Load our export. ``lm_path`` overrides where an export without its LM looks for it (`resolve_lm`);
    with ``swap_lm`` it is another LM of the same config put in place of the export's (`swapped_lm`), held
    or referenced, every other weight unchanged. With ``dtype`` None the model keeps the dtype of the
    export's own weights (a separate LM is cast to it: one dtype per model); a tensor in another float dtype
    among them is refused (`check_dtypes`)."""
    path = Path(path)
    cfg_file = path / "config.json"
    _, meta, sd = read_export(path, (KIND,), EXTRA_KEYS, MultimodalConfig)
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


def _fingerprint(lm: Llama, legacy: bool) -> str:
    # legacy: the form exports recorded before 2026-12-03 (dtypes listed, values in their own dtype), still
    # accepted when loading so that those exports keep finding their LM
    sd = lm.state_dict()
    tensors = sorted((k, list(v.shape), *([str(v.dtype)] if legacy else [])) for k, v in sd.items())
    digest = hashlib.sha256(json.dumps({"config": config_to_dict(lm.cfg), "tensors": tensors}).encode())
    for name, *_ in tensors:
        sample = sd[name].detach().flatten()[:FINGERPRINT_SAMPLE].cpu()
        sample = (sample if legacy else sample.to(torch.float64)).contiguous()
        digest.update(sample.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def lm_record(lm: Llama, lm_path: str | Path | None, out_dir: Path) -> dict:
    """The config.json keys that say where the LM of an export without its LM is (none with its LM)."""
    if lm_path is None:
        return {}
    absolute = Path(lm_path).resolve()
    return {"lm_path": str(absolute), "lm_path_relative": os.path.relpath(absolute, out_dir.resolve()),
            "lm_fingerprint": lm_fingerprint(lm)}


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
