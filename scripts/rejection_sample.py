"""Rejection sampling (Llama 3's post-training): sample answers from a policy, keep the good ones as SFT data.

    python -m scripts.rejection_sample --checkpoint POLICY_EXPORT --prompts FILE.jsonl --out DIR [--n 8]
        [--temperature 0.7 [T ...]] [--top-p 1.0] [--seed 0] [--max-new-tokens 64] [--reward-model RM_EXPORT]
        [--checker exact|vqa|none] [--keep 1] [--min-pass-rate 0] [--per-shard 1000] [--lm DIR] [--json]

--prompts: JSONL, one prompt a line: {"id", "image": a path relative to the file's folder (optional: text-only
prompts are allowed), "question", "answers": [known correct answers] (optional)}. Integer ids are read as
strings. Every row is checked before the model loads (keys, ids unique, the question non-empty and free of
``<|image|>``, every image decoding, answers present where the checker needs them); a problem is one line
naming the file, line and id, and exit status 2.

Per prompt: ``--n`` answers are sampled, sample j at temperature ``T[j % len(T)]`` (the paper samples at several
temperatures); one `generate` call per temperature, the prompt repeated, its generator seeded from (--seed, the
prompt's id, the temperature's index): a run is reproducible, and a prompt's samples do not depend on the other
rows. Empty answers never survive. The checker then filters them (a sample passes when its score is > 0):
  vqa    (the default when the rows have answers) the VQA answer normalisation of common.vqa_metrics; with two or
         more known answers the score is their vqa_accuracy (normalize_all), with one it is the 0/1 match
  exact  case and whitespace folded, then an exact match with one of the answers (score 0 or 1)
  none   (the default without answers) every non-empty sample passes
A prompt is dropped when no sample passed, or when its pass rate over the N samples is below --min-pass-rate
("drop questions the model rarely gets right"). The distinct surviving answers are ranked by the reward model
(--reward-model: an export with a reward head, `adapters.reward.score_answers`) when given, then by checker
score, then by sample order; the best --keep are kept.

Writes, in DIR (stale results of an earlier run deleted first):
  shards/shard_00000.tar, ...  webdataset shards of the kept answers in the trainer's conversation format:
        key.json {"meta": {"conversations": [{"role": "user", "content": "<|image|>question"}, {"role":
        "assistant", "content": answer}], "source": "rejection_sample", "id", "reward", "checker",
        "checker_score", "temperature", "sample"}} and key.<jpg|png|webp> (the image file's bytes; other formats
        re-encoded as png); text-only prompts have no image and no placeholder. Train on them with
        data.format: conversation.
  status.jsonl  one row per input prompt, in input order: {"id", "status": "kept" | "dropped", "reason",
        "n_samples", "n_passed", "kept": [answers, best first], "rewards": [their rewards] (null without
        --reward-model)}
  report.json   written last: prompts, counts by status and by drop reason, samples written, shards, the config
With --json the report is printed as the last stdout line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from adapters.chat import Message, encode_dialog
from adapters.checkpoint import CheckpointError
from adapters.generation import GenerationLengthError, SamplingConfig, check_length, collect_ids, generate, stream_text
from adapters.multimodal import ImageBatch, MultimodalLlama
from adapters.reward import score_answers
from adapters.tokenizer import Tokenizer, TokenizerError
from common.conversation import IMAGE_PLACEHOLDER
from common.export import write_atomic
from common.jsonl import read_jsonl
from common.vqa_metrics import vqa_accuracy, vqa_normalize
from media.image import ImageLoadError, load_image
from scripts._batch import PROGRESS_MIN_ROWS, BatchInputError, parse_row
from scripts.demo_vqa import find_tokenizer, load_export, positive_int, temperature, top_p
from scripts.evaluate import parse_id, read_unique
from training.codecs import IMAGE_EXTS
from vision.tiling import TiledImage, TilingConfig, TilingError, collate_tiled, tile_image

KEYS = ("id", "image", "question", "answers")
SHARDS, STATUS, REPORT = "shards", "status.jsonl", "report.json"
SOURCE = "rejection_sample"
EMPTY, NO_PASS, LOW_RATE = "every sample was empty", "no sample passed the checker", "pass rate below --min-pass-rate"


# ---------------------------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Prompt:
    id: str
    image: Path | None  # resolved against the prompts file's folder; None: a text-only prompt
    question: str
    answers: tuple[str, ...]  # known correct answers; () when the row has none
    where: str  # "FILE:LINE (id 'x')"


def read_prompts(path: str | Path) -> list[Prompt]:
    """Every row of the prompts file, checked (see the module docstring); raises `BatchInputError`."""
    path = Path(path)
    prompts = read_unique(path, read_jsonl(path, BatchInputError, what="prompts file"), parse_prompt,
                          lambda prompt: prompt.id)
    if not prompts:
        raise BatchInputError(f"{path}: no prompts")
    return prompts


def parse_prompt(path: Path, n: int, obj: dict) -> Prompt:
    where = f"{path}:{n}"
    if unknown := sorted(set(obj) - set(KEYS)):
        raise BatchInputError(f"{where}: unknown keys {unknown} (expected id, question, and optionally image, "
                              f"answers)")
    row_id = parse_id(obj, where)
    where = f"{where} (id {row_id!r})"
    question = obj.get("question")
    if not isinstance(question, str) or not question.strip():
        raise BatchInputError(f"{where}: 'question' must be a non-empty string, got {question!r}")
    if IMAGE_PLACEHOLDER in question:
        raise BatchInputError(f"{where}: the question holds {IMAGE_PLACEHOLDER}: the row's image goes before the "
                              f"question by itself (leave the placeholder out)")
    image = None
    if "image" in obj:
        image = parse_row(path, n, {"id": row_id, "image": obj["image"], "question": question}, "image").media
        try:
            load_image(image)
        except ImageLoadError as e:
            raise BatchInputError(f"{where}: bad image: {e}") from None
    answers = obj.get("answers", [])
    if not isinstance(answers, list) or ("answers" in obj and not answers) or not all(
            isinstance(a, str) and a.strip() for a in answers):
        raise BatchInputError(f"{where}: 'answers' must be a non-empty list of non-empty strings, got {answers!r}")
    return Prompt(row_id, image, question.strip(), tuple(answers), where)


def resolve_checker(prompts: list[Prompt], checker: str | None) -> str:
    """--checker, defaulting to vqa when the rows have answers and none when they do not; a checker needs the
    answers of every row (`BatchInputError` naming the first row without)."""
    chosen = checker or ("vqa" if any(p.answers for p in prompts) else "none")
    if chosen != "none" and (bare := next((p for p in prompts if not p.answers), None)):
        how = "" if checker else " (the default when rows have answers)"
        raise BatchInputError(f"{bare.where}: no 'answers': --checker {chosen}{how} checks every sample against its "
                              f"row's known answers; give every row its answers, or pass --checker none")
    return chosen


# ---------------------------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class Sample:
    index: int  # its place among the prompt's N samples
    text: str  # stripped
    temperature: float


def sample_seed(seed: int, prompt_id: str, group: int) -> int:
    """The generator seed of one prompt's samples at its ``group``-th temperature."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{prompt_id}/{group}".encode()).digest()[:8], "little") >> 1


def draw_samples(model: MultimodalLlama, tok: Tokenizer, ids: list[int], tiled: TiledImage | None, n: int,
                 temperatures: Sequence[float], top_p_mass: float, max_new_tokens: int, seed: int,
                 prompt_id: str) -> list[Sample]:
    """``n`` sampled answers to one prompt, sample j at ``temperatures[j % len]``: one `generate` call per
    temperature, the prompt repeated, seeded by `sample_seed`."""
    samples: list[Sample | None] = [None] * n
    for group, temp in enumerate(temperatures):
        idx = list(range(group, n, len(temperatures)))
        if not idx:
            continue
        prompt = torch.tensor([ids] * len(idx))
        images = None
        if tiled is not None:
            images = ImageBatch.from_collated(collate_tiled([[tiled]] * len(idx))).trimmed()
        sampling = SamplingConfig(max_new_tokens, temperature=temp, top_p=top_p_mass,
                                  seed=sample_seed(seed, prompt_id, group))
        rows = collect_ids(generate(model, prompt, images, sampling, tok.stop_ids), tok.stop_ids)
        for j, row_ids in zip(idx, rows):
            samples[j] = Sample(j, "".join(stream_text(tok, row_ids, tok.stop_ids)).strip(), temp)
    return samples


# ---------------------------------------------------------------------------------------------- selection


def _folded(text: str) -> str:
    return " ".join(text.casefold().split())


def exact_score(answer: str, answers: Sequence[str]) -> float:
    return float(_folded(answer) in {_folded(a) for a in answers})


def vqa_score(answer: str, answers: Sequence[str]) -> float:
    if len(answers) >= 2:
        return vqa_accuracy(answer, answers, normalize_all=True)
    return float(vqa_normalize(answer) == vqa_normalize(answers[0]))


CHECKERS: dict[str, Callable[[str, Sequence[str]], float] | None] = {"vqa": vqa_score, "exact": exact_score,
                                                                       "none": None}


@dataclass(frozen=True)
class Kept:
    sample: Sample
    checker_score: float | None
    reward: float | None


@dataclass(frozen=True)
class Selection:
    kept: list[Kept]  # best first; [] when dropped
    n_passed: int
    reason: str | None  # why the prompt was dropped; None when kept
    reason_kind: str | None  # EMPTY, NO_PASS or LOW_RATE: what report.json counts


def select(samples: list[Sample], answers: Sequence[str], checker: str, keep: int, min_pass_rate: float,
           rewards: Callable[[list[str]], list[float]] | None) -> Selection:
    """Filter by the checker, drop the prompt on no pass or a low pass rate, rank the distinct survivors by
    reward (when ``rewards`` scores answers), checker score, then sample order, and keep the best ``keep``."""
    check = CHECKERS[checker]
    scored = [(s, check(s.text, answers) if check else None) for s in samples if s.text]
    passed = [(s, c) for s, c in scored if c is None or c > 0]
    rate = len(passed) / len(samples)
    if not scored:
        return Selection([], 0, EMPTY, EMPTY)
    if not passed:
        return Selection([], 0, NO_PASS, NO_PASS)
    if rate < min_pass_rate:
        return Selection([], len(passed), f"pass rate {rate:.2f} < {min_pass_rate:g}", LOW_RATE)
    first: dict[str, tuple[Sample, float | None]] = {}
    for s, c in passed:
        first.setdefault(s.text, (s, c))  # each distinct answer as its first sample
    distinct = list(first.values())
    r = rewards([s.text for s, _ in distinct]) if rewards else [None] * len(distinct)
    order = sorted(range(len(distinct)), key=lambda i: (-(r[i] or 0.0), -(distinct[i][1] or 0.0), distinct[i][0].index))
    return Selection([Kept(*distinct[i], r[i]) for i in order[:keep]], len(passed), None, None)


# ---------------------------------------------------------------------------------------------- output


class ShardWriter:
    """Samples into ``folder/shard_00000.tar``, ... of at most ``per_shard`` each (webdataset, mtime 0: the same
    run writes the same bytes), each shard written under a temporary name and renamed when full or closed."""

    def __init__(self, folder: Path, per_shard: int):
        self.folder, self.per_shard = folder, per_shard
        self.pending: list[dict] = []
        self.paths: list[Path] = []
        self.n_samples = 0

    def add(self, sample: dict) -> None:
        self.pending.append(sample)
        self.n_samples += 1
        if len(self.pending) == self.per_shard:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        import webdataset as wds

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f, wds.TarWriter(f, mtime=0.0) as w:
                for s in self.pending:
                    w.write(s)

        path = self.folder / f"shard_{len(self.paths):05d}.tar"
        write_atomic(path, write)
        self.paths.append(path)
        self.pending = []


def image_member(path: Path) -> tuple[str, bytes]:
    """(extension, bytes) of the sample's image: the file itself when the trainer reads its format, else png."""
    ext = path.suffix.lower().lstrip(".")
    if ext in IMAGE_EXTS:
        return ext, path.read_bytes()
    import io

    buf = io.BytesIO()
    load_image(path).save(buf, format="PNG")
    return "png", buf.getvalue()


def sft_sample(key: str, prompt: Prompt, kept: Kept, checker: str, image: tuple[str, bytes] | None) -> dict:
    """One kept answer in the trainer's conversation format (training.codecs.ImageConversationCodec)."""
    content = (IMAGE_PLACEHOLDER if image else "") + prompt.question
    meta = {"conversations": [{"role": "user", "content": content},
                              {"role": "assistant", "content": kept.sample.text}],
            "source": SOURCE, "id": prompt.id, "reward": kept.reward, "checker": checker,
            "checker_score": kept.checker_score, "temperature": kept.sample.temperature, "sample": kept.sample.index}
    return {"__key__": key, "json": {"meta": meta}, **(dict([image]) if image else {})}


def clear_outputs(out: Path) -> None:
    """An earlier run's results: a failed run must not leave them looking like its own."""
    (out / REPORT).unlink(missing_ok=True)
    (out / STATUS).unlink(missing_ok=True)
    for old in sorted((out / SHARDS).glob("shard_*.tar")):
        old.unlink()


# ---------------------------------------------------------------------------------------------- main


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def load_models(args) -> tuple[MultimodalLlama, Tokenizer, tuple[MultimodalLlama, Tokenizer] | None]:
    """The policy and its tokenizer, and the reward model with its own (None without --reward-model)."""
    policy = load_export(args.checkpoint, args.lm)
    if policy.cfg.reward_head:
        raise CheckpointError(f"--checkpoint {args.checkpoint} is a reward model (it has a reward head): sample "
                              f"from the policy (the SFT or DPO export) and pass this one as --reward-model")
    tok = Tokenizer(find_tokenizer(Path(args.checkpoint), None))
    if args.reward_model is None:
        return policy, tok, None
    rm = load_export(args.reward_model, args.reward_lm)
    if not rm.cfg.reward_head:
        raise CheckpointError(f"--reward-model {args.reward_model} has no reward head: train one with kind: reward "
                              f"(training.preference)")
    return policy, tok, (rm, Tokenizer(find_tokenizer(Path(args.reward_model), None)))


def tiling_of(model: MultimodalLlama) -> TilingConfig:
    return TilingConfig(tile_size=model.cfg.vision.tile_size, max_tiles=model.cfg.vision.max_tiles)


def prompt_ids(tok: Tokenizer, prompt: Prompt) -> list[int]:
    return encode_dialog(tok, [Message("user", prompt.question, n_images=int(prompt.image is not None))])


def check_lengths(prompts: list[Prompt], policy: MultimodalLlama, tok: Tokenizer, rm, max_new_tokens: int) -> None:
    """Every prompt and its answers fit the policy's context, and the reward model's (answer plus its eot)."""
    for prompt in prompts:
        try:
            check_length(len(prompt_ids(tok, prompt)), max_new_tokens, policy.cfg.lm.max_seq_len)
            if rm is not None:
                check_length(len(prompt_ids(rm[1], prompt)), max_new_tokens + 1, rm[0].cfg.lm.max_seq_len)
        except GenerationLengthError as e:
            raise BatchInputError(f"{prompt.where}: --max-new-tokens: {e}") from None


def sample_prompt(i: int, prompt: Prompt, policy: MultimodalLlama, tok: Tokenizer, rm, checker: str,
                  writer: ShardWriter, args) -> dict:
    """Sample, filter and rank the answers to the ``i``-th prompt; the kept ones go to ``writer``. Returns its
    status.jsonl row, with the drop reason's kind under "reason_kind" (for report.json)."""
    try:
        tiled = tile_image(load_image(prompt.image), tiling_of(policy)) if prompt.image else None
        rm_tiled = tile_image(load_image(prompt.image), tiling_of(rm[0])) if prompt.image and rm else None
    except (ImageLoadError, TilingError) as e:  # it was read before the model loaded: changed since
        raise BatchInputError(f"{prompt.where}: bad image: {e}") from None
    samples = draw_samples(policy, tok, prompt_ids(tok, prompt), tiled, args.n, args.temperature, args.top_p,
                           args.max_new_tokens, args.seed, prompt.id)
    rewards = None
    if rm is not None:  # score_answers(model, tok, prompt_ids, images, answers) with the answers left open
        rewards = partial(score_answers, rm[0], rm[1], prompt_ids(rm[1], prompt), [rm_tiled] if rm_tiled else [])
    chosen = select(samples, prompt.answers, checker, args.keep, args.min_pass_rate, rewards)
    image = image_member(prompt.image) if prompt.image and chosen.kept else None
    for k, kept in enumerate(chosen.kept):
        writer.add(sft_sample(f"{i:06d}_{k:03d}", prompt, kept, checker, image))
    return {"id": prompt.id, "status": "dropped" if chosen.reason else "kept", "reason": chosen.reason,
            "n_samples": len(samples), "n_passed": chosen.n_passed, "kept": [k.sample.text for k in chosen.kept],
            "rewards": [k.reward for k in chosen.kept] if rm is not None else None, "reason_kind": chosen.reason_kind}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="the policy: our image-model export (SFT or DPO)")
    p.add_argument("--prompts", required=True, help="JSONL prompts (see above)")
    p.add_argument("--out", required=True, help="folder for shards/, status.jsonl and report.json")
    p.add_argument("--n", type=positive_int, default=8, help="samples per prompt")
    p.add_argument("--temperature", type=temperature, nargs="+", default=[0.7],
                   help="one or more; sample j is drawn at the (j mod count)-th")
    p.add_argument("--top-p", type=top_p, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--reward-model", default=None, help="an export with a reward head, to rank the survivors")
    p.add_argument("--checker", choices=sorted(CHECKERS), default=None,
                   help="default: vqa when the rows have answers, else none")
    p.add_argument("--keep", type=positive_int, default=1, help="distinct answers kept per prompt, best first")
    p.add_argument("--min-pass-rate", type=_fraction, default=0.0,
                   help="drop a prompt whose samples pass the checker less often than this")
    p.add_argument("--per-shard", type=positive_int, default=1000, help="samples per output shard")
    p.add_argument("--lm", default=None, help="the frozen LM of a policy export without it")
    p.add_argument("--reward-lm", default=None, help="the frozen LM of a reward-model export without it")
    p.add_argument("--json", action="store_true", help="print the report as JSON on the last stdout line")
    args = p.parse_args(argv)
    if args.reward_lm is not None and args.reward_model is None:
        p.error("--reward-lm goes with --reward-model")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        p.error(f"--out {out} is a file; name a folder")

    try:
        prompts = read_prompts(args.prompts)
        checker = resolve_checker(prompts, args.checker)
        if args.min_pass_rate > 0 and checker == "none":
            raise BatchInputError("--min-pass-rate needs a checker: rows with 'answers' and --checker vqa or exact")
        policy, tok, rm = load_models(args)
        check_lengths(prompts, policy, tok, rm, args.max_new_tokens)
    except (BatchInputError, CheckpointError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    clear_outputs(out)
    writer = ShardWriter(out / SHARDS, args.per_shard)
    rows: list[dict] = []
    reasons: Counter[str] = Counter()
    progress = tqdm(prompts, desc="rejection_sample", unit="prompt", file=sys.stderr,
                    disable=len(prompts) < PROGRESS_MIN_ROWS, mininterval=1.0)
    try:
        for i, prompt in enumerate(progress):
            rows.append(sample_prompt(i, prompt, policy, tok, rm, checker, writer, args))
            if kind := rows[-1].pop("reason_kind"):
                reasons[kind] += 1
        writer.flush()
        write_atomic(out / STATUS, lambda tmp: tmp.write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"))
        n_kept = sum(r["status"] == "kept" for r in rows)
        report = {"prompts": len(rows), "by_status": {"kept": n_kept, "dropped": len(rows) - n_kept},
                  "by_reason": {kind: reasons[kind] for kind in (EMPTY, NO_PASS, LOW_RATE)},
                  "samples_written": writer.n_samples, "shards": [str(path) for path in writer.paths],
                  "config": {"checkpoint": str(args.checkpoint), "prompts": str(args.prompts),
                             "reward_model": args.reward_model, "n": args.n, "temperatures": args.temperature,
                             "top_p": args.top_p, "seed": args.seed, "max_new_tokens": args.max_new_tokens,
                             "checker": checker, "keep": args.keep, "min_pass_rate": args.min_pass_rate,
                             "per_shard": args.per_shard}}
        write_atomic(out / REPORT, lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8"))
    except BatchInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: --out {out}: cannot write the results ({e.strerror or e})", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
    else:
        print(f"rejection_sample: kept {n_kept} of {len(rows)} prompts ({writer.n_samples} samples in "
              f"{len(writer.paths)} shards) -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
