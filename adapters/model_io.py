"""Our own multimodal checkpoint: ``config.json`` + ``model.safetensors`` (+ ``tokenizer.model``).

With ``lm_path`` the frozen LM is not copied (it is bitwise the checkpoint it came from): the
directory then holds the adapter, encoder and projector only, and records where the LM lives.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from adapters.checkpoint import CheckpointError, load_llama, load_state_dict_strict, read_json, read_safetensors_file
from adapters.llama import Llama, LlamaConfig, RopeScaling, rope_frequencies
from adapters.multimodal import MultimodalConfig, MultimodalLlama
from video.adapter import VideoAdapterConfig
from vision.encoder import VisionEncoderConfig

FORMAT = "llama3-mm/1"


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def strict_fields(cls, d: Any, where: str) -> dict:
    """``d`` checked against the dataclass ``cls``: not an object, or unknown keys, raise CheckpointError."""
    if not isinstance(d, dict):
        raise CheckpointError(f"{where}: expected an object, got {type(d).__name__}")
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise CheckpointError(f"{where}: unknown keys {sorted(unknown)}")
    return dict(d)


def llama_config_from_dict(d: Any, where: str) -> LlamaConfig:
    lm = strict_fields(LlamaConfig, d, where)
    if lm.get("rope_scaling") is not None:
        lm["rope_scaling"] = RopeScaling(**strict_fields(RopeScaling, lm["rope_scaling"], f"{where}.rope_scaling"))
    return LlamaConfig(**lm)


def config_from_dict(d: dict, where: str = "config.json") -> MultimodalConfig:
    """Strict inverse of ``config_to_dict``: unknown keys anywhere are an error naming them."""
    d = strict_fields(MultimodalConfig, d, where)
    for key in ("lm", "vision"):
        if not isinstance(d.get(key), dict):
            raise CheckpointError(f"{where}: missing the {key!r} section")
    vision = strict_fields(VisionEncoderConfig, d["vision"], f"{where}: vision")
    vision["taps"] = tuple(vision["taps"])
    d["lm"], d["vision"] = llama_config_from_dict(d["lm"], f"{where}: lm"), VisionEncoderConfig(**vision)
    if d.get("video") is not None:
        d["video"] = VideoAdapterConfig(**strict_fields(VideoAdapterConfig, d["video"], f"{where}: video"))
    return MultimodalConfig(**d)


def write_checkpoint_dir(out_dir: str | Path, meta: dict, state_dict: dict[str, torch.Tensor],
                         tokenizer_path: str | Path | None = None) -> Path:
    """``config.json`` (``meta``) + ``model.safetensors`` (``state_dict``) + ``tokenizer.model`` when given."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(meta, indent=2))
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(out / "model.safetensors"))
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, out / "tokenizer.model")
    return out


def save_checkpoint(
    model: MultimodalLlama, out_dir: str | Path, tokenizer_path: str | Path | None = None, lm_path: str | None = None
) -> Path:
    sd = model.state_dict()
    if lm_path is not None:
        sd = {k: v for k, v in sd.items() if not k.startswith("lm.")}
    # The encoder's weights are in this checkpoint: its initial ``pretrained`` source is provenance only
    # (loading must not need that file or tag again).
    cfg = dataclasses.replace(model.cfg, vision=dataclasses.replace(model.cfg.vision, pretrained=None))
    meta = {"format": FORMAT, "lm_path": lm_path, "config": config_to_dict(cfg),
            "encoder_initialised_from": model.cfg.vision.pretrained}
    return write_checkpoint_dir(out_dir, meta, sd, tokenizer_path)


def load_checkpoint(path: str | Path, dtype: torch.dtype | None = None) -> MultimodalLlama:
    path = Path(path)
    cfg_file, weights = path / "config.json", path / "model.safetensors"
    meta = read_json(cfg_file)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_file}: format {meta.get('format')!r} is not {FORMAT!r}")
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{cfg_file}: no 'config' object")
    cfg = config_from_dict(meta["config"], str(cfg_file))
    sd = read_safetensors_file(weights)
    lm: Llama | None = None
    if meta.get("lm_path"):
        lm = load_llama(meta["lm_path"], dtype)
        if lm.cfg != cfg.lm:
            raise CheckpointError(f"{cfg_file}: lm_path {meta['lm_path']} has config {lm.cfg}, expected {cfg.lm}")
        sd.update({f"lm.{k}": v for k, v in lm.state_dict().items()})
    with torch.device("meta"):
        model = MultimodalLlama(cfg, Llama(cfg.lm))
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    load_state_dict_strict(model, sd, str(path))
    model.lm.inv_freq = rope_frequencies(cfg.lm.head_dim, cfg.lm.rope_theta, cfg.lm.rope_scaling)
    model.lm.freeze()
    return model


def load_multimodal_checkpoint(
    path: str | Path, dtype: torch.dtype | None = None, vision_config: VisionEncoderConfig | None = None
) -> MultimodalLlama:
    """Load a multimodal checkpoint in any layout we read, chosen by its files: Meta (params.json),
    HF Mllama (config.json with model_type 'mllama') or our own (config.json from ``adapters.model_io``)."""
    from adapters.mllama import load_mllama  # these import this module's siblings; keep import time low
    from adapters.mllama_meta import load_meta_vision

    path = Path(path)
    if (path / "params.json").exists():
        return load_meta_vision(path, dtype, vision_config)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: neither params.json (Meta layout) nor config.json (HF or ours) found")
    if vision_config is not None:
        raise CheckpointError(f"{path}: vision_config is for Meta's layout only; config.json has the sizes")
    config = read_json(cfg_file)
    if config.get("model_type") == "mllama":
        return load_mllama(path, dtype)
    if config.get("format") == FORMAT:
        return load_checkpoint(path, dtype)
    raise CheckpointError(
        f"{cfg_file}: neither an HF Mllama config (model_type 'mllama') nor our format {FORMAT!r}"
    )
