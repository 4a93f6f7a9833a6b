"""Averaging the trainable weights of exports that share a base: the last step of a hyper-parameter sweep
(Llama 3 paper, sec. 7.5: the vision SFT runs of a sweep are ranked and the weights of the top K averaged).

    scores = read_scores("scores.json", exports)  # optional: the validation metric of each export
    record = average_exports(exports, "runs/avg/export", top_k_exports(exports, scores, 2), scores)

The exports must be one kind (``multimodal``: image and video models, or ``speech``) and differ in their trained
weights only; each refusal is an `ExportMismatchError` naming the export and the field:

* config.json: the same format and model config (every field); the same provenance keys (``lm_fingerprint``,
  ``encoder_initialised_from``, any key the format adds); all or none hold their frozen LM. Where the LM lives
  (``lm_path``, ``lm_path_relative``) may differ: an LM that moved is the same LM;
* ``tokenizer.model``: the same bytes, or absent from all;
* ``model.safetensors``: the same tensor names, shapes and dtypes, and every frozen tensor (not a trainable
  parameter of the model the config builds: an LM the export holds, a frozen encoder, buffers) bitwise equal.

All given exports are checked; the chosen ones' trainable tensors are averaged in float32 (float64 stays float64)
and cast back to their dtype, frozen tensors copied. The output is a normal export of the same kind
(`common.export.write_export`): the same config, provenance keys, tokenizer and LM reference (``lm_path`` of the
first export, ``lm_path_relative`` recomputed from the output). The export formats refuse unknown config.json
keys, so which exports were averaged, with their scores, goes to `RECORD` beside config.json, written before it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open

from adapters.llama import Llama
from adapters.model_io import EXTRA_KEYS as MULTIMODAL_EXTRA_KEYS
from adapters.model_io import check_lm_keys
from adapters.multimodal import MultimodalConfig, MultimodalLlama
from common.config import CheckpointError, config_to_dict
from common.export import CONFIG, TOKENIZER, WEIGHTS, ExportFormatError, read_export_meta, write_export
from common.jsonl import read_jsonl, read_text
from speech.adapter import SpeechLlama, SpeechLlamaConfig

RECORD = "averaging.json"
LOCATION_KEYS = ("lm_path", "lm_path_relative")  # where the frozen LM lives, not which LM it is


class _Format(NamedTuple):
    config_cls: type
    extra_keys: tuple[str, ...]
    model_cls: type  # built on the meta device to tell trainable tensors from frozen ones


FORMATS = {"multimodal": _Format(MultimodalConfig, MULTIMODAL_EXTRA_KEYS, MultimodalLlama),
           "speech": _Format(SpeechLlamaConfig, (), SpeechLlama)}


class AveragingError(CheckpointError):
    """Exports that cannot be averaged, or a score file that cannot rank them; the message names the file."""


class ExportMismatchError(AveragingError):
    """An export that does not share the first one's base: the message names it and the differing field."""


class ScoreFileError(AveragingError):
    """A metric file that is unreadable, malformed, or has no score for one of the exports."""


@dataclass
class _Export:
    path: Path
    kind: str
    meta: dict  # config.json, its "config" read into the kind's config class
    tokenizer: str | None  # sha256 of tokenizer.model


# ---------------------------------------------------------------------------------------------- scores


def read_scores(path: str | Path, exports: list[Path]) -> dict[Path, float]:
    """{export: score} for every export in ``exports`` from the metric file at ``path``: ``*.json``, an object
    {export path: score}, or ``*.jsonl``, rows {"export", "score"}. Relative export paths are read from the
    file's folder. Entries for other exports are ignored; a missing one raises `ScoreFileError`."""
    path = Path(path)
    entries: dict[Path, tuple[float, str]] = {}  # resolved export -> (score, where it was given)
    for where, export, score in _score_entries(path):
        if not isinstance(export, str) or not export:
            raise ScoreFileError(f"{where}: an export must be a non-empty path string, got {export!r}")
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise ScoreFileError(f"{where}: the score of {export!r} must be a finite number, got {score!r}")
        key = (path.parent / export).resolve()
        if key in entries:
            raise ScoreFileError(f"{where}: a second score for {key} (first at {entries[key][1]})")
        entries[key] = float(score), where
    for export in exports:
        if export.resolve() not in entries:
            raise ScoreFileError(f"{path}: no score for export {export} (looked for {export.resolve()}; "
                                 f"relative paths in the file are read from its folder)")
    return {export: entries[export.resolve()][0] for export in exports}


def _score_entries(path: Path) -> list[tuple[str, Any, Any]]:
    """(where, export, score) as the file gives them."""
    if path.suffix == ".jsonl":
        rows = []
        for n, row in read_jsonl(path, ScoreFileError, "metric file"):
            if set(row) != {"export", "score"}:
                raise ScoreFileError(f"{path}:{n}: expected keys ['export', 'score'], got {sorted(row)}")
            rows.append((f"{path}:{n}", row["export"], row["score"]))
        return rows
    if path.suffix != ".json":
        raise ScoreFileError(f"{path}: a metric file is *.json (an object export -> score) or *.jsonl (rows "
                             f"{{\"export\", \"score\"}})")
    try:
        mapping = json.loads(read_text(path, ScoreFileError, "metric file"))
    except json.JSONDecodeError as e:
        raise ScoreFileError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(mapping, dict):
        raise ScoreFileError(f"{path}: expected an object export -> score, got {type(mapping).__name__}")
    return [(f"{path} ({export!r})", export, score) for export, score in mapping.items()]


def top_k_exports(exports: list[Path], scores: dict[Path, float], k: int, lower_is_better: bool = False
                  ) -> list[Path]:
    """The ``k`` best of ``exports`` by ``scores`` (higher is better unless ``lower_is_better``), best first;
    ties keep the given order."""
    if not 1 <= k <= len(exports):
        raise AveragingError(f"top-k {k}: must be between 1 and the number of exports ({len(exports)})")
    return sorted(exports, key=lambda e: scores[e] if lower_is_better else -scores[e])[:k]


# ---------------------------------------------------------------------------------------------- averaging


def average_exports(exports: list[str | Path], out_dir: str | Path, chosen: list[str | Path] | None = None,
                    scores: dict[Path, float] | None = None, selection: dict | None = None) -> dict:
    """Check that ``exports`` share a base (see the module docstring), then write the average of ``chosen``
    (default: all of them) into ``out_dir``. ``scores`` and ``selection`` (how ``chosen`` was picked) go into
    the record, which is returned."""
    paths = [Path(e) for e in exports]
    chosen_paths = paths if chosen is None else [Path(c) for c in chosen]
    out = Path(out_dir)
    _check_paths(paths, chosen_paths, out)
    infos = [_read(p) for p in paths]
    for other in infos[1:]:
        _check_same_base(infos[0], other)
    index = {p.resolve(): i for i, p in enumerate(paths)}
    picked = [index[c.resolve()] for c in chosen_paths]
    trainable = _trainable_names(infos[0])
    with ExitStack() as stack:
        files = [stack.enter_context(_open_weights(info.path)) for info in infos]
        _check_layouts(infos, files)
        state_dict = {name: _merge(name, name in trainable, infos, files, picked) for name in files[0].keys()}
    scores = scores or {}
    record = {"selection": selection or {"method": "uniform"},
              "exports": [{"path": str(p.resolve()), "score": scores.get(p), "averaged": i in picked}
                          for i, p in enumerate(paths)],
              "averaged": [str(paths[i].resolve()) for i in picked]}
    first = infos[0]
    extra = {k: v for k, v in first.meta.items() if k not in ("format", "config")}
    if extra.get("lm_path"):
        extra.update(_lm_location(first, out))
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG).unlink(missing_ok=True)  # the record never sits beside another export's config.json
        tmp = out / f".{RECORD}.tmp"
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, out / RECORD)
        tokenizer = first.path / TOKENIZER if first.tokenizer else None
        write_export(out, first.kind, first.meta["config"], state_dict, tokenizer, extra)
    except OSError as e:
        raise AveragingError(f"{out}: cannot write the average ({e.strerror or e})") from None
    return record


def _check_paths(paths: list[Path], chosen: list[Path], out: Path) -> None:
    seen: dict[Path, Path] = {}
    for p in paths:
        if p.resolve() in seen:
            raise AveragingError(f"{p}: given twice (as {seen[p.resolve()]} and {p}): it would count double")
        seen[p.resolve()] = p
    if out.resolve() in seen:
        raise AveragingError(f"out {out} is one of the exports being averaged; write the average elsewhere")
    if not chosen or any(c.resolve() not in seen for c in chosen):
        raise AveragingError(f"the exports to average {[str(c) for c in chosen]} must be among the given ones")


def _read(path: Path) -> _Export:
    """config.json read by its kind's own rules, and the tokenizer's digest."""
    every_extra = sorted({k for f in FORMATS.values() for k in f.extra_keys})
    kind = read_export_meta(path, tuple(FORMATS), every_extra)[0]  # which kind; its own rules next
    fmt = FORMATS[kind]
    _, meta = read_export_meta(path, (kind,), fmt.extra_keys, fmt.config_cls)
    check_lm_keys(meta, path / CONFIG)
    tok = path / TOKENIZER
    return _Export(path, kind, meta, hashlib.sha256(tok.read_bytes()).hexdigest() if tok.is_file() else None)


def _check_same_base(a: _Export, b: _Export) -> None:
    """`ExportMismatchError` naming ``b`` and the first field in which it differs from ``a``."""
    def refuse(field: str, found: Any, want: Any, why: str = "") -> None:
        raise ExportMismatchError(f"{b.path}: {field} is {found!r}, {a.path} has {want!r}{why}")

    if a.meta["format"] != b.meta["format"]:
        refuse("format", b.meta["format"], a.meta["format"], ": exports of one kind only")
    if diff := _first_difference(config_to_dict(a.meta["config"]), config_to_dict(b.meta["config"]), "config"):
        refuse(*diff)
    if bool(a.meta.get("lm_path")) != bool(b.meta.get("lm_path")):
        refuse("lm_path", b.meta.get("lm_path"), a.meta.get("lm_path"),
               ": one export holds its frozen LM, the other points at one")
    for key in sorted((set(a.meta) | set(b.meta)) - {"format", "config", *LOCATION_KEYS}):
        if a.meta.get(key) != b.meta.get(key):
            refuse(key, b.meta.get(key), a.meta.get(key),
                   ": trained on another frozen LM" if key == "lm_fingerprint" else ": not the same base")
    if a.tokenizer != b.tokenizer:
        def show(digest: str | None) -> str:
            return "absent" if digest is None else f"sha256 {digest[:12]}..."

        refuse(TOKENIZER, show(b.tokenizer), show(a.tokenizer), ": not the same tokenizer")


def _first_difference(a: Any, b: Any, where: str) -> tuple[str, Any, Any] | None:
    """(dotted field, b's value, a's value) of the first difference between two config dicts, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in [*a, *(k for k in b if k not in a)]:
            if key not in a or key not in b:
                return f"{where}.{key}", b.get(key), a.get(key)
            if diff := _first_difference(a[key], b[key], f"{where}.{key}"):
                return diff
        return None
    return None if a == b else (where, b, a)


def _trainable_names(info: _Export) -> set[str]:
    """Names of the trainable parameters of the model ``info``'s config builds (no memory: meta device)."""
    cfg = info.meta["config"]
    with torch.device("meta"):
        model = FORMATS[info.kind].model_cls(cfg, Llama(cfg.lm))
    return {name for name, _ in model.trainable_named_parameters()}


def _open_weights(path: Path):
    """``model.safetensors`` opened lazily: tensors are read one at a time, never a whole export at once."""
    weights = path / WEIGHTS
    if not weights.is_file():
        raise ExportFormatError(f"{weights}: not found")
    try:
        return safe_open(str(weights), framework="pt")
    except Exception as e:  # safetensors raises its own error types
        raise ExportFormatError(f"{weights}: cannot read safetensors ({e})") from None


def _check_layouts(infos: list[_Export], files: list) -> None:
    """The same tensor names, shapes and dtypes in every export, read from the headers alone."""
    def layout(f) -> dict[str, tuple[list[int], str]]:
        return {name: (f.get_slice(name).get_shape(), f.get_slice(name).get_dtype()) for name in f.keys()}

    want = layout(files[0])
    for info, f in zip(infos[1:], files[1:]):
        found = layout(f)
        if missing := sorted(set(want) - set(found)):
            raise ExportMismatchError(f"{info.path}: tensor names: lacks {missing[:3]} ({len(missing)} in all), "
                                      f"which {infos[0].path} has")
        if extra := sorted(set(found) - set(want)):
            raise ExportMismatchError(f"{info.path}: tensor names: has {extra[:3]} ({len(extra)} in all), "
                                      f"which {infos[0].path} lacks")
        for name, (shape, dtype) in want.items():
            for field, a, b in (("shape", shape, found[name][0]), ("dtype", dtype, found[name][1])):
                if a != b:
                    raise ExportMismatchError(f"{info.path}: tensor {name} has {field} {b}, {infos[0].path} "
                                              f"has {a}")


def _merge(name: str, trainable: bool, infos: list[_Export], files: list, picked: list[int]) -> torch.Tensor:
    """A trainable float tensor: the mean over ``picked`` in float32 (float64 kept), cast back to its dtype.
    Any other: bitwise equal in every export (a frozen tensor that differs is another base), copied."""
    first = files[picked[0]].get_tensor(name)
    if trainable and first.is_floating_point():
        wide = torch.float64 if first.dtype == torch.float64 else torch.float32
        total = first.to(wide)
        for i in picked[1:]:
            total += files[i].get_tensor(name).to(wide)
        return (total / len(picked)).to(first.dtype)
    for info, f in zip(infos, files):
        if not torch.equal(f.get_tensor(name), first):
            raise ExportMismatchError(f"{info.path}: frozen tensor {name} differs from {infos[picked[0]].path}'s: "
                                      f"not the same base")
    return first


def _lm_location(first: _Export, out: Path) -> dict:
    """``lm_path`` / ``lm_path_relative`` of the output: the first export's LM where it is found now (its
    absolute path, else its relative one), the relative path recomputed from ``out``."""
    absolute = Path(first.meta["lm_path"])
    relative = first.meta.get("lm_path_relative")
    if not absolute.exists() and relative and (first.path / relative).exists():
        absolute = first.path / relative
    absolute = absolute.resolve()
    return {"lm_path": str(absolute), "lm_path_relative": os.path.relpath(absolute, out.resolve())}
