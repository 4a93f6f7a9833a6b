"""Score an export on a benchmark's local task file with the benchmark's own metric.

    python -m scripts.evaluate --checkpoint EXPORT --task T --data FILE|SHARDS --out DIR [--max-new-tokens 64]
        [--batch-size 8] [--lm DIR] [--frames N]

Tasks (metrics: common.vqa_metrics, and common.metrics for WER / CER; every score is a fraction, not a %):
  vqav2             VQA accuracy: min(#matching annotators / 3, 1) averaged over the 10 leave-one-out subsets,
                    after the official script's answer normalisation
  textvqa           the same metric, every answer normalised (as TextVQA's evaluator does)
  docvqa, infovqa   ANLS: 1 - normalised Levenshtein distance to the closest answer, 0 from distance 0.5 up
  chartqa           relaxed accuracy: numbers within 5 % of the reference, other answers exact (any case)
  video_mc          multiple-choice accuracy: the option the answer names, by letter or by text
  asr               corpus WER (CER too), English normalisation of common.metrics
  preference        pairwise accuracy of a reward model (an export with a reward head, kind: reward): the fraction
                    of rows whose chosen answer it scores above the rejected one (a tie counts as wrong)

--data: JSONL, or a .parquet file; one row per question: {"id", "image" | "video" | "audio": a path relative
to the file's folder, "question", "answers": [...]}. video_mc rows add "options": [...] (lettered A, B, ... in
the prompt, which asks for the letter) and "answers": [the correct option's letter or text]; vqav2 / textvqa
rows hold the annotators' answers (10 in the benchmarks, at least 2); asr rows have no question (the prompt is
"Repeat after me in English:") and "answers": [the reference transcript]. preference rows hold no "answers" but
"chosen" and "rejected": two different non-empty answers to the question about the image. Integer ids are read
as strings. The checkpoint is a reward model for --task preference, and not one for any other task.
--data SHARDS: webdataset shards as the shard builders write them (a ``.tar`` path, glob or brace pattern; several
space-separated): one row per sample, its key the id, ``question`` and ``answers`` (or one ``answer``; video_mc
also ``options``) from key.json's ``meta``, its image / video / audio member extracted into DIR/shard_media/.
Every row is checked (keys, answers, media files present) before the model loads; a problem is one line
naming the file, line (parquet: row number; shards: sample number) and id, and exit status 2.

Decoding is greedy. --batch-size rows are decoded together: image and video rows are grouped by prompt length
(and tile count), so no row sees padding it would not see alone: its answer is scripts.demo_vqa's /
demo_video's (the tests compare them); asr batches
audio pieces of different lengths (padded, masked), as scripts.demo_asr cuts them. preference generates nothing:
each row's two answers are scored by `adapters.reward.score_answers` (the prompt, the answer and its <|eot_id|>,
the row the reward kind trains on), in one forward pass.

Writes, in DIR: predictions.jsonl ({"id", "answer"}, input order; preference: "chosen" or "rejected", whichever
scored higher), scores.jsonl ({"id", "score"} per row; asr also word errors and reference words, preference
"reward_chosen" and "reward_rejected"), then metrics.json ({"task", "metric", "score", "n", "checkpoint", "data"};
asr adds the WER and CER totals). Each file is written under a temporary name and renamed; a run
deletes the previous run's scores and metrics first, so metrics.json is there only when the run finished.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import torch

from adapters.chat import Message, encode_dialog
from adapters.checkpoint import CheckpointError
from adapters.generation import GenerationLengthError, SamplingConfig, check_length, collect_ids, generate, stream_text
from adapters.multimodal import ImageBatch
from adapters.reward import answer_row, score_answers
from adapters.tokenizer import Tokenizer, TokenizerError
from adapters.video_adapter import VideoBatch
from common.export import ExportFormatError, export_format, write_atomic
from common.jsonl import read_jsonl
from common.metrics import cer, normalize_text, wer
from common.vqa_metrics import OPTION_LETTERS, anls, mc_accuracy, relaxed_accuracy, vqa_accuracy
from media.audio import AUDIO_EXTS, MAX_SECONDS, SAMPLE_RATE, AudioReadError
from media.image import ImageLoadError, load_image
from media.video import VideoReader, VideoReadError
from scripts._batch import MEDIA_KEYS, BatchInputError, Row, parse_row, write_predictions
from scripts.demo_asr import max_piece_samples, read_pieces
from scripts.demo_video import StillImageError, read_clip, video_model_problem
from scripts.demo_vqa import EXPORT_USES, find_tokenizer, positive_int
from speech.adapter import asr_prompt, encode_speech_dialog, speech_decode
from training.codecs import IMAGE_EXTS, VIDEO_EXTS
from vision.frames import collate_videos, tile_frames, video_tiling
from vision.tiling import TilingConfig, collate_tiled, tile_image

PREDICTIONS, SCORES, METRICS = "predictions.jsonl", "scores.jsonl", "metrics.json"
MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
T = TypeVar("T")


@dataclass(frozen=True)
class Item:
    """One checked row: ``row.question`` is the prompt (video_mc: with the lettered options)."""

    row: Row
    answers: tuple[str, ...]
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Task:
    media: str  # the row key of its inputs: image, video or audio
    metric: str
    score: Callable[[str, Item], float] | None  # (prediction, item) -> [0, 1]; None: corpus WER


TASKS = {
    "vqav2": Task("image", "vqa_accuracy", lambda pred, item: vqa_accuracy(pred, item.answers)),
    "textvqa": Task("image", "vqa_accuracy", lambda pred, item: vqa_accuracy(pred, item.answers, normalize_all=True)),
    "docvqa": Task("image", "anls", lambda pred, item: anls(pred, item.answers)),
    "infovqa": Task("image", "anls", lambda pred, item: anls(pred, item.answers)),
    "chartqa": Task("image", "relaxed_accuracy", lambda pred, item: relaxed_accuracy(pred, item.answers)),
    "video_mc": Task("video", "mc_accuracy", lambda pred, item: mc_accuracy(pred, item.options, item.answers[0])),
    "asr": Task("audio", "wer", None),
    "preference": Task("image", "pairwise_accuracy", lambda pred, item: int(pred == "chosen")),
}
PAIR = ("chosen", "rejected")  # a preference row's answers, in Item.answers' order


def mc_prompt(question: str, options: tuple[str, ...]) -> str:
    """The question, its options one per line as "A. text", and the instruction to answer with a letter."""
    lines = [question, *(f"{OPTION_LETTERS[i]}. {option}" for i, option in enumerate(options)), MC_INSTRUCTION]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- task files


def read_records(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, or 1-based row number of a parquet file; object) for every row (parquet nulls dropped)."""
    if path.suffix.lower() != ".parquet":
        yield from read_jsonl(path, BatchInputError, what="data file")
        return
    import pyarrow
    import pyarrow.parquet as pq

    if not path.is_file():
        raise BatchInputError(f"data file not found: {path}")
    try:
        records = pq.read_table(path).to_pylist()
    except (OSError, pyarrow.ArrowException) as e:
        raise BatchInputError(f"{path}: not a readable parquet file ({e})") from None
    for n, record in enumerate(records, 1):
        yield n, {k: v for k, v in record.items() if v is not None}


SHARD_MEDIA = "shard_media"  # DIR/shard_media/: the media of --data shards, extracted for the answering code


def is_shards(data: str) -> bool:
    """--data names webdataset shards: a ``.tar`` path, glob or brace pattern (several: space-separated)."""
    return all(part.endswith(".tar") for part in data.split())


def read_shard_records(data: str, task_name: str, media_dir: Path) -> Iterator[tuple[Path, int, dict]]:
    """(shard, n, row) from webdataset shards (the shard builders' samples): id = the key, ``question`` and
    ``answers`` (or one ``answer``) from key.json's ``meta``, the media member extracted into ``media_dir``;
    ``n`` counts the samples of the shard from 1."""
    from media.tar import ShardError, expand_shards, read_tar

    media_key = TASKS[task_name].media
    exts = {"image": IMAGE_EXTS, "video": VIDEO_EXTS, "audio": AUDIO_EXTS}[media_key]
    try:
        for shard in expand_shards(data.split(), BatchInputError):
            for n, (key, members) in enumerate(read_tar(shard), 1):
                where = f"{shard}: sample {key}"
                try:
                    meta = json.loads(members["json"])["meta"] if "json" in members else {}
                except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                    raise BatchInputError(f"{where}.json: no readable 'meta' object ({e})") from None
                ext = next((e for e in exts if e in members), None)
                if ext is None:
                    raise BatchInputError(f"{where}: no {media_key} member (has {sorted(members)})")
                media = media_dir / shard.stem / f"{key}.{ext}"
                media.parent.mkdir(parents=True, exist_ok=True)
                media.write_bytes(members[ext])
                answers = meta.get("answers", [meta["answer"]] if "answer" in meta else None)
                row = {"id": key, media_key: str(media.resolve()), "answers": answers,
                       **({"question": meta["question"]} if "question" in meta else {}),
                       **({"options": meta["options"]} if "options" in meta else {})}
                yield shard, n, {k: v for k, v in row.items() if v is not None}
    except ShardError as e:
        raise BatchInputError(str(e)) from None


def read_items(path: str | Path, task_name: str, media_dir: Path | None = None) -> list[Item]:
    """Every row of the task file (or of the shards, their media extracted into ``media_dir``), checked (see
    the module docstring); raises `BatchInputError`."""
    if is_shards(str(path)):
        if media_dir is None:
            raise BatchInputError(f"{path}: reading shards needs a folder for their media (media_dir)")
        rows = list(read_shard_records(str(path), task_name, media_dir))
        items = [parse_item(shard, n, obj, task_name) for shard, n, obj in rows]
        seen: dict[str, str] = {}
        for item in items:
            if item.row.id in seen:
                raise BatchInputError(f"{item.row.where}: duplicate id (key) {item.row.id!r}, first at "
                                      f"{seen[item.row.id]}")
            seen[item.row.id] = item.row.where
    else:
        path = Path(path)
        items = read_unique(path, read_records(path), lambda p, n, obj: parse_item(p, n, obj, task_name),
                            lambda item: item.row.id, "row" if path.suffix.lower() == ".parquet" else "line")
    if not items:
        raise BatchInputError(f"{path}: no rows")
    if task_name == "asr" and not any(normalize_text(item.answers[0]).split() for item in items):
        raise BatchInputError(f"{path}: the reference transcripts hold no words (after normalisation): "
                              f"a word error rate over zero reference words is undefined")
    return items


def read_unique(path: Path, records: Iterable[tuple[int, dict]], parse: Callable[[Path, int, dict], T],
                id_of: Callable[[T], str], unit: str = "line") -> list[T]:
    """``parse(path, n, obj)`` of every (n, obj) record, in order; a repeated id is a `BatchInputError` naming
    where it came first (``unit``: line, or row of a parquet file)."""
    rows: list[T] = []
    first: dict[str, int] = {}
    for n, obj in records:
        row = parse(path, n, obj)
        if (row_id := id_of(row)) in first:
            raise BatchInputError(f"{path}:{n}: duplicate id {row_id!r} (first on {unit} {first[row_id]})")
        first[row_id] = n
        rows.append(row)
    return rows


def parse_id(obj: dict, where: str) -> str:
    """The row's id: a non-empty string, or an integer read as one."""
    row_id = obj.get("id")
    if isinstance(row_id, int) and not isinstance(row_id, bool):
        row_id = str(row_id)
    if not isinstance(row_id, str) or not row_id:
        raise BatchInputError(f"{where}: 'id' must be a non-empty string or an integer, got {row_id!r}")
    return row_id


def parse_item(path: Path, n: int, obj: dict, task_name: str) -> Item:
    """Row ``n`` of the task file; its id, media file and question are checked as scripts._batch checks them."""
    where = f"{path}:{n}"
    media_key = TASKS[task_name].media
    other = sorted(k for k in MEDIA_KEYS if k != media_key and k in obj)
    if other:
        takes = sorted(name for name, task in TASKS.items() if task.media == other[0])
        raise BatchInputError(f"{where}: a row with {other[0]!r}; --task {task_name} takes {media_key!r} rows "
                              f"({other[0]!r} rows are for --task {' / '.join(takes)})")
    row_id = parse_id(obj, where)
    where = f"{where} (id {row_id!r})"
    answer_keys = list(PAIR) if task_name == "preference" else ["answers"]
    expected = ["id", media_key, *(["question"] if media_key != "audio" else []), *answer_keys,
                *(["options"] if task_name == "video_mc" else [])]
    if "answers" not in obj and task_name != "preference":
        hint = " (found 'answer': name the list 'answers')" if "answer" in obj else ""
        raise BatchInputError(f"{where}: no 'answers': every row of a task file needs its ground-truth "
                              f"answers{hint}")
    if missing := [k for k in expected if k not in obj and k != "question"]:
        raise BatchInputError(f"{where}: no {missing[0]!r} key")
    if unknown := sorted(set(obj) - set(expected) - {"question"}):  # a speech row's question: refused below
        raise BatchInputError(f"{where}: unknown keys {unknown} for --task {task_name} (expected "
                              f"{', '.join(expected)})")
    batch_row = {k: obj[k] for k in (media_key, "question") if k in obj}
    row = parse_row(path, n, {"id": row_id, **batch_row}, media_key)
    answers = _pair(obj, where) if task_name == "preference" else _strings(obj, "answers", where)
    options = _strings(obj, "options", where) if task_name == "video_mc" else ()
    if options:
        row = replace(row, question=mc_prompt(row.question, options))
    item = Item(row, answers, options)
    _check_answers(task_name, item)
    return item


def _strings(obj: dict, key: str, where: str) -> tuple[str, ...]:
    value = obj[key]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise BatchInputError(f"{where}: {key!r} must be a non-empty list of strings, got {value!r}")
    return tuple(value)


def _pair(obj: dict, where: str) -> tuple[str, str]:
    """(chosen, rejected): two non-empty strings, different once stripped."""
    for key in PAIR:
        if not isinstance(obj[key], str) or not obj[key].strip():
            raise BatchInputError(f"{where}: {key!r} must be a non-empty string, got {obj[key]!r}")
    chosen, rejected = (obj[key].strip() for key in PAIR)
    if chosen == rejected:
        raise BatchInputError(f"{where}: 'chosen' and 'rejected' are the same answer ({chosen[:60]!r}): a "
                              f"preference pair needs two different answers")
    return chosen, rejected


def _check_answers(task_name: str, item: Item) -> None:
    """The metric's own refusals (too few VQA answers, an answer naming no option...), before any model loads."""
    if task_name == "asr":
        if len(item.answers) != 1:
            raise BatchInputError(f"{item.row.where}: an asr row's 'answers' holds its one reference transcript, "
                                  f"got {len(item.answers)}")
        return
    try:
        TASKS[task_name].score("", item)
    except ValueError as e:
        raise BatchInputError(f"{item.row.where}: {e}") from None


# ---------------------------------------------------------------------------------------------- answering


def load_model(checkpoint: Path, task_name: str, lm: str | None):
    """The export for ``task_name``, in eval mode; `CheckpointError` naming what it is when it is another kind,
    or a reward model for a task that is not preference (or the reverse)."""
    from adapters.model_io import load_checkpoint
    from speech.model_io import load_speech_checkpoint

    speech = TASKS[task_name].media == "audio"
    try:
        model = load_speech_checkpoint(checkpoint) if speech else load_checkpoint(checkpoint, lm_path=lm).eval()
    except ExportFormatError as e:
        if e.found_kind is None:
            raise
        want = "a speech model" if speech else "an image/video model"
        raise CheckpointError(f"{checkpoint}: --task {task_name} needs {want}, and this export (format "
                              f"{export_format(e.found_kind)!r}) is {EXPORT_USES[e.found_kind]}") from None
    if not speech and model.cfg.reward_head != (task_name == "preference"):
        if task_name == "preference":
            raise CheckpointError(f"{checkpoint}: --task preference needs a reward model (an export with a reward "
                                  f"head, trained with kind: reward), and this one has none")
        raise CheckpointError(f"{checkpoint} is a reward model (it scores answers, it writes none): evaluate it "
                              f"with --task preference")
    return model


class BatchedAnswers:
    """``answer(row)`` for `write_predictions`: the first time a row is asked for, its whole batch is decoded.
    ``answers`` keeps every answer by id."""

    def __init__(self, batches: list[list[Row]], decode: Callable[[list[Row]], list[str]],
                 details: dict[str, dict] | None = None):
        self.batch_of = {row.id: batch for batch in batches for row in batch}
        self.decode = decode
        self.answers: dict[str, str] = {}
        self.details = {} if details is None else details  # by id: more scores.jsonl fields (decode fills them)

    def __call__(self, row: Row) -> str:
        if row.id not in self.answers:
            batch = self.batch_of[row.id]
            self.answers.update(zip((r.id for r in batch), self.decode(batch)))
        return self.answers[row.id]


def _chunks(rows: list[Row], size: int) -> list[list[Row]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def _text(tok: Tokenizer, ids: list[int]) -> str:
    return "".join(stream_text(tok, ids, tok.stop_ids))


def multimodal_answers(model, tok: Tokenizer, items: list[Item], args) -> BatchedAnswers:
    """Greedy answers of the image / video model, up to --batch-size rows per `generate` call: rows of one
    prompt length and tile count, so no row sees padding it would not see alone."""
    video = TASKS[args.task].media == "video"
    frames = args.frames or (model.cfg.video.max_frames if model.cfg.video is not None else 1)
    if video and (problem := video_model_problem(model.cfg, Path(args.checkpoint), frames)):
        raise CheckpointError(problem)
    prompts = {}
    for item in items:
        media = {"n_videos": 1} if video else {"n_images": 1}
        prompts[item.row.id] = encode_dialog(tok, [Message("user", item.row.question, **media)])
        try:
            check_length(len(prompts[item.row.id]), args.max_new_tokens, model.cfg.lm.max_seq_len)
        except GenerationLengthError as e:
            raise BatchInputError(f"{item.row.where}: --max-new-tokens: {e}") from None
    vcfg = model.cfg.vision
    tiling = video_tiling(vcfg.tile_size) if video else TilingConfig(tile_size=vcfg.tile_size,
                                                                     max_tiles=vcfg.max_tiles)
    reader = VideoReader() if video else None
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)

    def tiled(row: Row):
        try:
            if video:
                return tile_frames(read_clip(reader, row.media, frames), tiling)
            return tile_image(load_image(row.media), tiling)
        except (ImageLoadError, StillImageError, VideoReadError) as e:
            raise BatchInputError(f"{row.where}: {e}") from None

    def decode(rows: list[Row]) -> list[str]:
        media = [tiled(row) for row in rows]
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, (row, m) in enumerate(zip(rows, media)):
            groups[(len(prompts[row.id]), int(m.tile_mask.sum(-1).max()))].append(i)
        out = [""] * len(rows)
        for idx in groups.values():
            prompt = torch.tensor([prompts[rows[i].id] for i in idx])
            collated = [[media[i]] for i in idx]
            images = None if video else ImageBatch.from_collated(collate_tiled(collated)).trimmed()
            videos = VideoBatch.from_collated(collate_videos(collated)).trimmed() if video else None
            ids = collect_ids(generate(model, prompt, images, sampling, tok.stop_ids, videos=videos), tok.stop_ids)
            for i, row_ids in zip(idx, ids):
                out[i] = _text(tok, row_ids)
        return out

    by_length = sorted((item.row for item in items), key=lambda row: len(prompts[row.id]))
    return BatchedAnswers(_chunks(by_length, args.batch_size), decode)


def preference_answers(model, tok: Tokenizer, items: list[Item], args) -> BatchedAnswers:
    """The reward model's verdict per row: "chosen" when it scores the chosen answer above the rejected one, else
    "rejected"; both rewards go to ``details``. A row that cannot fit the model's context is refused up front."""
    prompts, pairs = {}, {}
    for item in items:
        prompts[item.row.id] = encode_dialog(tok, [Message("user", item.row.question, n_images=1)])
        pairs[item.row.id] = list(item.answers)
        longest = max(len(answer_row(tok, prompts[item.row.id], a)) for a in item.answers)
        if longest > model.cfg.lm.max_seq_len:
            raise BatchInputError(f"{item.row.where}: the prompt and the longer answer take {longest} tokens, more "
                                  f"than the reward model's max_seq_len ({model.cfg.lm.max_seq_len})")
    tiling = TilingConfig(tile_size=model.cfg.vision.tile_size, max_tiles=model.cfg.vision.max_tiles)
    details: dict[str, dict] = {}

    def decode(rows: list[Row]) -> list[str]:
        out = []
        for row in rows:
            try:
                tiled = tile_image(load_image(row.media), tiling)
            except ImageLoadError as e:
                raise BatchInputError(f"{row.where}: {e}") from None
            chosen, rejected = score_answers(model, tok, prompts[row.id], [tiled], pairs[row.id])
            details[row.id] = {"reward_chosen": chosen, "reward_rejected": rejected}
            out.append(PAIR[0] if chosen > rejected else PAIR[1])
        return out

    return BatchedAnswers(_chunks([item.row for item in items], args.batch_size), decode, details)


def speech_answers(model, tok: Tokenizer, items: list[Item], args) -> BatchedAnswers:
    """Greedy transcripts of the speech model: each audio cut into the pieces scripts.demo_asr cuts, up to
    --batch-size pieces per `speech_decode` call, a row's piece texts joined by spaces."""
    prompt = encode_speech_dialog(tok, asr_prompt("English"))
    piece_samples = max_piece_samples(model.cfg, len(prompt), args.max_new_tokens, round(MAX_SECONDS * SAMPLE_RATE))
    if piece_samples < 1:
        raise BatchInputError(f"--max-new-tokens {args.max_new_tokens} leaves no room for audio: the checkpoint "
                              f"holds {model.cfg.seq_limit} positions and the prompt takes {len(prompt)}")
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)

    def decode(rows: list[Row]) -> list[str]:
        pieces = []
        for row in rows:
            try:
                pieces.append(read_pieces(row.media, piece_samples)[1])
            except AudioReadError as e:
                raise BatchInputError(f"{row.where}: {e}") from None
        flat = [piece.samples for row_pieces in pieces for piece in row_pieces]
        texts: list[str] = []
        for start in range(0, len(flat), args.batch_size):
            chunk = flat[start : start + args.batch_size]
            lengths = torch.tensor([len(x) for x in chunk])
            waves = torch.zeros(len(chunk), int(lengths.max()))
            for i, x in enumerate(chunk):
                waves[i, : len(x)] = torch.from_numpy(x)
            tokens = torch.tensor([prompt] * len(chunk))
            ids = collect_ids(speech_decode(model, tokens, waves, lengths, sampling, tok.stop_ids), tok.stop_ids)
            texts += [_text(tok, row_ids) for row_ids in ids]
        out, k = [], 0
        for row_pieces in pieces:
            out.append(" ".join(texts[k : k + len(row_pieces)]))
            k += len(row_pieces)
        return out

    return BatchedAnswers(_chunks([item.row for item in items], args.batch_size), decode)


# ---------------------------------------------------------------------------------------------- scoring


def score_items(task_name: str, items: list[Item], predictions: dict[str, str],
                details: dict[str, dict] | None = None) -> tuple[dict, list[dict]]:
    """(metrics.json's score fields, one {"id", "score", ...} per row in input order; ``details`` adds fields)."""
    task = TASKS[task_name]
    details = details or {}
    if task.score is not None:
        rows = [{"id": item.row.id, "score": task.score(predictions[item.row.id], item), **details.get(item.row.id, {})}
                for item in items]
        return {"score": sum(r["score"] for r in rows) / len(rows)}, rows
    refs = [item.answers[0] for item in items]
    hyps = [predictions[item.row.id] for item in items]
    words, chars = wer(refs, hyps), cer(refs, hyps)
    rows = [{"id": item.row.id, "score": u.rate if u.n_ref else None, "word_errors": u.errors,
             "n_ref_words": u.n_ref} for item, u in zip(items, words.utterances)]
    return {"score": words.rate, "wer": words.to_dict(), "cer": chars.to_dict()}, rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="our export (image/video model, speech for asr, a reward model for preference)")
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--data", required=True, help="the task file: JSONL or .parquet (see above)")
    p.add_argument("--out", required=True, help="folder for predictions.jsonl, scores.jsonl, metrics.json")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--lm", default=None, help="the frozen LM of an image/video export without it")
    p.add_argument("--frames", type=positive_int, default=None,
                   help="video_mc: frames per video (default: the checkpoint's video.max_frames)")
    args = p.parse_args(argv)
    media = TASKS[args.task].media
    if args.lm is not None and media == "audio":
        p.error("--lm goes with image/video exports (a speech export holds its LM)")
    if args.frames is not None and media != "video":
        p.error("--frames goes with --task video_mc")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        p.error(f"--out {out} is a file; name a folder")

    try:
        items = read_items(args.data, args.task, out / SHARD_MEDIA)
        model = load_model(Path(args.checkpoint), args.task, args.lm)
        tok = Tokenizer(find_tokenizer(Path(args.checkpoint), None))
        if media == "audio":
            answers = speech_answers(model, tok, items, args)
        elif args.task == "preference":
            answers = preference_answers(model, tok, items, args)
        else:
            answers = multimodal_answers(model, tok, items, args)
    except (BatchInputError, CheckpointError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for stale in (METRICS, SCORES):  # a failed run must not leave the last run's results beside its predictions
        (out / stale).unlink(missing_ok=True)
    status = write_predictions([item.row for item in items], answers, out / PREDICTIONS, (), "evaluate")
    if status:
        return status
    summary, rows = score_items(args.task, items, answers.answers, answers.details)
    metrics = {"task": args.task, "metric": TASKS[args.task].metric, "score": summary.pop("score"), "n": len(items),
               "checkpoint": str(args.checkpoint), "data": str(args.data), **summary}
    texts = {SCORES: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
             METRICS: json.dumps(metrics, indent=2) + "\n"}
    for name, text in texts.items():  # metrics.json last: it says the run finished
        try:
            write_atomic(out / name, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        except OSError as e:
            print(f"error: --out {out}: cannot write {name} ({e.strerror or e})", file=sys.stderr)
            return 2
    print(f"{args.task}: {metrics['metric']} {metrics['score']:.4f} over {len(items)} rows -> {out / METRICS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
