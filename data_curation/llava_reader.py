"""LLaVA-style conversation records -> one conversation ``Sample`` each (``Sample.images`` set, no caption).

The input is a ``.json`` file holding a list of objects, or a ``.jsonl`` file of one object per line whose first
row has a ``conversations`` field (``is_conversation_jsonl``; other ``.jsonl`` files are caption manifests). A
record is ``{"id": ..., "image": "rel/a.jpg" | ["a.jpg", "b.jpg"] | absent, "conversations": [{"from": "human" |
"gpt" | "system", "value": "..."}, ...]}``. Image paths are relative to ``image_folder`` (default: the file's
folder) and, unless ``allow_outside_root``, must resolve inside it.

Each record becomes the trainer's conversation layout (``training.data``, ``data.format: conversation``): meta
``{"conversations": [{"role", "content"}, ...], **the record's other fields}`` with human -> user, gpt ->
assistant, system -> system and ``<image>`` -> ``<|image|>``; a record with images but no ``<image>`` gets one
``<|image|>\\n`` per image at the start of its first human turn (LLaVA's convention). The turns must pass
``common.conversation.check_conversation``, the trainer's own check, and hold one placeholder per image.

A record that cannot be used is an error Sample whose reason names the record (index or line), the field
and, last, the record's id: stage ``conversation`` for the record's layout (not an object, an unknown ``from``,
a non-string ``value``, roles out of order, no assistant turn, placeholders that do not match the images),
stage ``read`` for its files (missing, unreadable, outside the root, above ``max_sample_bytes`` together). A
``.json`` file that is not valid JSON or not a list is a ``CurationInputError`` naming the file; a bad ``.jsonl``
line is an error Sample, as in the caption manifests. Keys are ``<file stem>_<index>``: the 0-based record index
(``.json``) or the 1-based line (``.jsonl``), as for manifests; ``source`` is ``"<file>:<index or line>"``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from common.conversation import IMAGE_PLACEHOLDER, ConversationError, check_conversation
from data_curation.input_files import (DEFAULT_MAX_SAMPLE_BYTES, TOO_LARGE, CurationInputError, InputNotFound,
                                       SampleReadError, _bad_text_reason, open_regular, read_input_file,
                                       sanitize_key)
from data_curation.readers import _capped_lines, _is_url, jsonl_objects
from data_curation.records import Sample

LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
LLAVA_PLACEHOLDER = "<image>"


def is_conversation_jsonl(path: Path, max_bytes: int = DEFAULT_MAX_SAMPLE_BYTES) -> bool:
    """Whether the first non-blank line of ``path`` is a JSON object with a ``conversations`` field (a LLaVA
    file, not a caption manifest). A file that cannot be read says no: the manifest reader names the problem."""
    try:
        f, _ = open_regular(path, f"manifest {path}")
    except SampleReadError:
        return False
    with f:
        for raw in _capped_lines(f, max_bytes):
            if raw is None:
                return False
            if raw.strip():
                try:
                    row = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    return False
                return isinstance(row, dict) and "conversations" in row
    return False


def read_llava(path: str | Path, *, image_folder: str | Path | None = None,
               max_sample_bytes: int = DEFAULT_MAX_SAMPLE_BYTES, allow_outside_root: bool = False) -> Iterator[Sample]:
    """The records of a LLaVA ``.json`` list or ``.jsonl`` file as conversation Samples (see the module doc)."""
    path = Path(path)
    base = Path(image_folder) if image_folder is not None else path.parent
    if not base.is_dir():
        raise CurationInputError(f"image folder not found: {base} (image paths of {path} start there)")
    root = None if allow_outside_root else base.resolve()
    try:
        f, _ = open_regular(path, f"conversation file {path}")
    except SampleReadError as e:
        raise CurationInputError(str(e)) from None
    if path.suffix.lower() == ".jsonl":
        return _jsonl_records(path, f, base, root, max_sample_bytes)
    with f:
        try:
            records = json.loads(f.read().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CurationInputError(f"{path}: not a readable LLaVA JSON file ({e})") from None
    if not isinstance(records, list):
        raise CurationInputError(f"{path}: a LLaVA JSON file holds a list of records, not {_kind(records)}")
    return _json_records(path, records, base, root, max_sample_bytes)


def _json_records(path: Path, records: list, base: Path, root: Path | None, max_bytes: int) -> Iterator[Sample]:
    stem = sanitize_key(path.stem)
    for i, rec in enumerate(records):
        sample = Sample(key=f"{stem}_{i:09d}", source=f"{path}:{i}")
        yield llava_sample(sample, rec, f"{path.name} record {i}", base, root, max_bytes)


def _jsonl_records(path: Path, lines: BinaryIO, base: Path, root: Path | None, max_bytes: int) -> Iterator[Sample]:
    for sample, where, rec in jsonl_objects(path, lines, max_bytes):
        yield llava_sample(sample, rec, where, base, root, max_bytes) if sample.ok else sample


def llava_sample(sample: Sample, rec: Any, where: str, base: Path, root: Path | None, max_bytes: int) -> Sample:
    """``sample`` filled from one LLaVA record (its conversation, meta and image bytes), or failed with a reason
    naming ``where`` (the record), the field and, last, the record's id (in parentheses, so that reports count
    reasons, not records: ``shard_jobs.reason_kind``)."""
    if not isinstance(rec, dict):
        return sample.fail("conversation", f"{where}: {_kind(rec)}, not a record object")
    rid = f" (id {rec['id']!r})" if "id" in rec else ""

    def bad(stage: str, reason: str) -> Sample:
        return sample.fail(stage, f"{where}: {reason}{rid}")

    err = _bad_text_reason(rec, where)
    if err is not None:
        return sample.fail("read", err)  # the id itself may be the text that cannot be written
    try:
        turns = llava_turns(rec.get("conversations"))
        paths = image_paths(rec.get("image"))
        turns = place_images(turns, len(paths))
    except ConversationError as e:
        return bad("conversation", str(e))
    images, total = [], 0
    for k, rel in enumerate(paths):
        field = f"image[{k}]" if isinstance(rec.get("image"), list) else "image"
        if _is_url(rel):
            return bad("read", f"{field} {rel!r} is a URL; download it first")
        file = base / rel
        try:
            images.append(read_input_file(file, str(file), max_bytes, root))
        except InputNotFound:
            return bad("read", f"{field} file not found: {file}")
        except SampleReadError as e:
            return bad("read", f"{field}: {e}")
        total += len(images[-1])
        if total > max_bytes:
            return bad("read", f"its images hold {total} bytes together, {TOO_LARGE} ({max_bytes})")
    sample.images = images
    sample.meta = {**{k: v for k, v in rec.items() if k != "conversations"}, "conversations": turns}
    return sample


def llava_turns(conversations: Any) -> list[dict[str, str]]:
    """LLaVA ``{"from", "value"}`` turns -> checked ``{"role", "content"}`` turns (``<image>`` -> ``<|image|>``);
    a `ConversationError` names the field."""
    if not isinstance(conversations, list) or not conversations:
        what = ("an empty list" if isinstance(conversations, list) else "missing" if conversations is None
                else _kind(conversations))
        raise ConversationError(f"conversations is {what}, not a list of {{'from', 'value'}} turns")
    turns = []
    for i, t in enumerate(conversations):
        field = f"conversations[{i}]"
        if not isinstance(t, dict):
            raise ConversationError(f"{field} is {_kind(t)}, not a {{'from', 'value'}} object")
        if t.get("from") not in LLAVA_ROLES:
            raise ConversationError(f"{field}.from {t.get('from')!r} is not one of {tuple(LLAVA_ROLES)}")
        value = t.get("value")
        if not isinstance(value, str):
            what = "missing" if "value" not in t else f"{_kind(value)}, not a string"
            raise ConversationError(f"{field}.value is {what}")
        turns.append({"role": LLAVA_ROLES[t["from"]], "content": value.replace(LLAVA_PLACEHOLDER, IMAGE_PLACEHOLDER)})
    check_conversation(turns)
    return turns


def image_paths(image: Any) -> list[str]:
    """The record's ``image`` field as a list of paths: absent or null -> [], a path -> [path]."""
    if image is None:
        return []
    if isinstance(image, str):
        return [image]
    if isinstance(image, list) and all(isinstance(p, str) for p in image):
        return list(image)
    bad = next((f"image[{k}] is {_kind(p)}" for k, p in enumerate(image) if not isinstance(p, str)),
               None) if isinstance(image, list) else f"image is {_kind(image)}"
    raise ConversationError(f"{bad}, not a path (image: a path or a list of paths)")


def place_images(turns: list[dict[str, str]], n_images: int) -> list[dict[str, str]]:
    """``turns`` with one ``<|image|>`` per image: as they are when they hold ``n_images`` placeholders; when they
    hold none, at the start of the first user turn followed by a newline (LLaVA's convention), next to each other
    so that the question sees every image (consecutive image tokens share their text span, as in Mllama). Any
    other count is a `ConversationError`."""
    n = sum(t["content"].count(IMAGE_PLACEHOLDER) for t in turns)
    if n == 0 and n_images:
        first = next(i for i, t in enumerate(turns) if t["role"] == "user")  # check_conversation: there is one
        turns = [*turns]
        turns[first] = {**turns[first], "content": IMAGE_PLACEHOLDER * n_images + "\n" + turns[first]["content"]}
    elif n != n_images:
        raise ConversationError(f"conversations hold {n} {LLAVA_PLACEHOLDER} placeholder(s) but image names "
                                f"{n_images} file(s); each image needs one placeholder, in order")
    return turns


def _kind(value: Any) -> str:
    """``"a list"``, ``"an int"``: what a JSON value is, for reasons."""
    name = type(value).__name__
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"
