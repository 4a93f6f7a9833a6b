"""The one export layout every trained model is written in, and its one reader.

    write_export("out", "speech", cfg, model.state_dict(), tokenizer_path=tok.path)
    kind, meta, sd = read_export("out", ("speech",))

An export is a directory with ``config.json`` = ``{"format": "llama3-mm/<kind>/1", "config": {...}, extras}``
(``config`` is a config dataclass through `config_to_dict`; extras are the model's own top-level keys),
``model.safetensors`` (the state dict) and ``tokenizer.model`` when the model has one. The kinds are
`KINDS`; the loaders of each model (``adapters.model_io``, ``speech.model_io``, ``speech.pretrain``,
``training.clip``) pass their config class and get the config back read strictly (`dataclass_from_dict`).

Writing is crash-safe: ``config.json`` is what marks a directory as an export, so it is removed first
(an older export in the same place stops being one) and written last; every file is written under a
temporary name and renamed, so a crash leaves either the whole export or no ``config.json``.

Reading refuses, with an `ExportFormatError` naming the file, the expected and the found format: a
directory that is another kind's export, an export in a format we no longer write, a foreign directory
(a Hugging Face or Meta checkpoint), a missing file, damaged JSON or unknown top-level keys.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from common.config import CheckpointError, config_to_dict, dataclass_from_dict

PREFIX, VERSION = "llama3-mm", 1
KINDS = ("multimodal", "speech", "speech-encoder", "clip-encoder")
CONFIG, WEIGHTS, TOKENIZER = "config.json", "model.safetensors", "tokenizer.model"
_CORE_KEYS = frozenset({"format", "config"})


class ExportFormatError(CheckpointError):
    """A directory that is not a readable export of the expected kind. ``found_kind`` is set when it is
    another kind of ours (so a demo can say which tool takes it)."""

    def __init__(self, message: str, found_kind: str | None = None):
        super().__init__(message)
        self.found_kind = found_kind


def export_format(kind: str) -> str:
    """The ``format`` tag of ``kind``'s exports: ``llama3-mm/<kind>/1``."""
    if kind not in KINDS:
        raise ValueError(f"export kind {kind!r} is not one of {KINDS}")
    return f"{PREFIX}/{kind}/{VERSION}"


def write_export(out_dir: str | Path, kind: str, config: Any, state_dict: dict[str, torch.Tensor],
                 tokenizer_path: str | Path | None = None, extra_meta: dict | None = None) -> Path:
    """Write ``kind``'s export into ``out_dir`` (see the module docstring); ``config`` is a config dataclass
    (written through `config_to_dict`) or a JSON-ready dict. Returns ``out_dir``."""
    extra = dict(extra_meta or {})
    if clash := sorted(_CORE_KEYS & set(extra)):
        raise ValueError(f"extra_meta may not set {clash}: the writer owns them")
    meta = {"format": export_format(kind),
            "config": config if isinstance(config, dict) else config_to_dict(config), **extra}
    text = json.dumps(meta, indent=2)  # before touching the directory: a config that is not JSON fails here
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG).unlink(missing_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    write_atomic(out / WEIGHTS, lambda tmp: save_file(tensors, str(tmp)))
    if tokenizer_path is not None:
        write_atomic(out / TOKENIZER, lambda tmp: shutil.copyfile(tokenizer_path, tmp))
    write_atomic(out / CONFIG, lambda tmp: tmp.write_text(text))
    return out


def write_atomic(dest: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` to a temporary file of a unique name beside ``dest``, then rename it onto ``dest``: a
    reader sees the old file or the whole new one. On failure the temporary file goes and nothing is renamed
    (the ``OSError`` propagates: callers name what they were writing)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def read_export_meta(path: str | Path, kinds: tuple[str, ...], extra_keys: Collection[str] = (),
                     config_cls: type | None = None) -> tuple[str, dict]:
    """(kind, config.json's content) of the export at ``path``, checked: its kind is one of ``kinds``, its
    ``config`` is an object and its other top-level keys are among ``extra_keys``. With ``config_cls``,
    ``meta["config"]`` comes back read into it by the strict `dataclass_from_dict`."""
    cfg_file = Path(path) / CONFIG
    expected = " or ".join(repr(export_format(k)) for k in kinds)
    if not cfg_file.is_file():
        raise ExportFormatError(f"{cfg_file}: not found{_foreign_layout(Path(path))}; expected an export "
                                f"of format {expected}")
    try:
        meta = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportFormatError(f"{cfg_file}: not valid JSON ({e}); expected an export of format {expected}"
                                ) from None
    if not isinstance(meta, dict):
        raise ExportFormatError(f"{cfg_file}: expected an object, got {type(meta).__name__}")
    found = meta.get("format")
    kind = next((k for k in KINDS if found == export_format(k)), None)
    if kind not in kinds:
        what = f"an HF config (model_type {meta['model_type']!r})" if "model_type" in meta else "no export"
        found_text = f"format {found!r}" if found is not None else f"no 'format' key ({what})"
        raise ExportFormatError(f"{cfg_file}: {found_text}, expected format {expected}", kind)
    if unknown := sorted(set(meta) - _CORE_KEYS - set(extra_keys)):
        raise ExportFormatError(f"{cfg_file}: unknown keys {unknown} for format {found!r}")
    if not isinstance(meta.get("config"), dict):
        raise ExportFormatError(f"{cfg_file}: no 'config' object")
    if config_cls is not None:
        meta["config"] = dataclass_from_dict(config_cls, meta["config"], str(cfg_file))
    return kind, meta


def _foreign_layout(path: Path) -> str:
    """A hint when ``path`` is not an export directory at all."""
    if not path.is_dir():
        return f" ({path} is not a directory)"
    if (path / "params.json").is_file():
        return " (params.json found: a Meta checkpoint, not our export)"
    return ""


def read_export(path: str | Path, kinds: tuple[str, ...], extra_keys: Collection[str] = (),
                config_cls: type | None = None) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """`read_export_meta`, then the state dict of ``model.safetensors`` (missing or damaged: an
    `ExportFormatError` naming it). The config is checked first: a bad one fails before GBs are read."""
    kind, meta = read_export_meta(path, kinds, extra_keys, config_cls)
    weights = Path(path) / WEIGHTS
    if not weights.is_file():
        raise ExportFormatError(f"{weights}: not found (config.json says format {meta['format']!r})")
    try:
        return kind, meta, load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types
        raise ExportFormatError(f"{weights}: cannot read safetensors ({e})") from None
