"""The post-training proof (Llama 3 sec. 7.5) on the production road, after the image road.

    run_posttrain_road(work_dir, seed) -> metrics

Starts from the image road's outputs under ``work_dir`` (scripts/learning_image.py; run first when its export
is missing): the frozen text LM, the tokenizer and the pre-trained image export. Then, every stage an entry
point's ``main(argv)``:

1. ``synthetic.posttrain.write_posttrain``: two-image conversations with single-image ones mixed in (LLaVA
   layout), preference scenes, and the held-out sets;
2. ``build_shards`` of the LLaVA JSON (conversation shards) and of the preference folder (preference shards);
3. ``train`` SFT (configs/run_image_sft_synthetic.yaml) from the image export, seeds S and S + 1, then
   ``average_checkpoints`` of the two; each, the average and the pre-trained image model answer the held-out
   two-image conversations and (``demo_vqa``) single-image colour and shape questions;
4. ``train`` reward (configs/run_reward_synthetic.yaml) from the SFT export, then ``evaluate --task
   preference``: held-out pairwise accuracy;
5. ``train`` image for ``EARLY_STEPS`` steps only (run_image_qa_synthetic stopped early: a model that still
   names wrong colours and shapes), ``train`` dpo (configs/run_dpo_synthetic.yaml) from it, and
   ``demo_vqa`` answers of both to held-out colour and shape questions: accuracy and hallucination rate (the
   fraction of answers naming another colour or shape than the scene's) before and after DPO.

Two-image questions are answered by greedy decoding of the export in this module (``conversation_answers``:
the conversation prompt with each ``<|image|>`` where it stands, as the trainer encodes it, in ragged batches),
since the demo scripts take one image per question.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from scripts import average_checkpoints, build_shards, evaluate
from scripts._road import (
    RoadError,
    Stage,
    offline_curation,
    rooted_overrides,
    run_stage,
    set_args,
    shown_path,
)
from scripts.learning_image import CURATION, IMAGE_RUN, RUN_CONFIGS, answer, run_image_road
from synthetic.posttrain import ATTRIBUTES, write_posttrain
from synthetic.score import normalize_answer, read_rows
from synthetic.tasks import SyntheticTaskError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
POST_CONFIGS = {"sft": CONFIGS / "run_image_sft_synthetic.yaml", "reward": CONFIGS / "run_reward_synthetic.yaml",
                "dpo": CONFIGS / "run_dpo_synthetic.yaml"}
DATA = Path("out/synthetic/posttrain")
SFT_SHARDS, PREFERENCE_SHARDS = DATA / "sft_shards", DATA / "preference_shards"
EARLY_RUN = Path("runs/synthetic/image_early")
EARLY_STEPS = 60  # the image run stopped here still names wrong colours and shapes: DPO's starting point
N_SFT, N_PREFERENCE, N_TEST = 800, 800, 100


# ---------------------------------------------------------------------------------------------- answering


@torch.inference_mode()
def conversation_answers(export: Path, rows: list[dict], root: Path, max_new_tokens: int = 4) -> dict[str, str]:
    """Greedy answers of ``export`` to held-out conversations ``{"id", "images", "conversation"}`` (images
    relative to ``root``), 32 rows at a time in ragged batches (`adapters.generation.stream`)."""
    from adapters.chat import Message, encode_header
    from adapters.generation import SamplingConfig, stream
    from adapters.model_io import load_checkpoint
    from adapters.multimodal import ImageBatch
    from adapters.tokenizer import Tokenizer
    from media.image import load_image
    from training.codecs import encode_conversation
    from vision.tiling import TilingConfig, collate_tiled, tile_image

    model = load_checkpoint(export).eval()
    tok = Tokenizer(export / "tokenizer.model")
    tiling = TilingConfig(tile_size=model.cfg.vision.tile_size, max_tiles=model.cfg.vision.max_tiles)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    answers = {}
    for start in range(0, len(rows), 32):
        chunk = rows[start : start + 32]
        prompts = [encode_conversation(tok, [Message(t["role"], t["content"]) for t in row["conversation"]])[0]
                   + encode_header(tok, "assistant") for row in chunk]
        images = ImageBatch.from_collated(collate_tiled([[tile_image(load_image(root / p), tiling)
                                                          for p in row["images"]] for row in chunk])).trimmed()
        texts = [""] * len(chunk)
        for pieces in stream(model, tok, prompts, sampling, images=images):
            texts = [t + piece for t, piece in zip(texts, pieces)]
        answers.update((row["id"], text) for row, text in zip(chunk, texts))
    return answers


def conversation_accuracy(rows: list[dict], answers: dict[str, str]) -> dict:
    """Exact match (normalised) overall and per kind."""
    right: dict[str, list[bool]] = {}
    for row in rows:
        hit = normalize_answer(answers[row["id"]]) == normalize_answer(row["answer"])
        right.setdefault(row["kind"], []).append(hit)
    flat = [r for rs in right.values() for r in rs]
    return {"accuracy": sum(flat) / len(flat), "by_kind": {k: sum(v) / len(v) for k, v in right.items()}}


def attribute_scores(answers_file: Path, predictions: Path) -> dict:
    """Accuracy and hallucination rate on colour / shape questions: a hallucination is an answer naming
    another value of the asked attribute (a wrong colour, a wrong shape) than the scene's."""
    want, got = read_rows(answers_file, ("answer", "kind")), read_rows(predictions, ("answer",))
    n = right = hallucinated = 0
    for qid, row in want.items():
        pred, truth = normalize_answer(got[qid]["answer"]), normalize_answer(row["answer"])
        n += 1
        right += pred == truth
        hallucinated += pred != truth and pred in ATTRIBUTES[row["kind"]]
    return {"accuracy": right / n, "hallucination_rate": hallucinated / n, "n": n}


# ---------------------------------------------------------------------------------------------- the road


def _train(config: Path, work: Path, seed: int, progress: bool, *extra: str) -> Stage:
    from scripts import train

    sets = rooted_overrides(config, work, seed, progress) + list(extra)
    return run_stage("train", train.main, ["--config", str(config), *set_args(sets)])


def run_posttrain_road(work: str | Path, seed: int = 0, progress: bool = True) -> dict:
    """The stages of the module docstring; returns every held-out figure and the seconds of each stage."""
    work = Path(work).resolve()
    seconds: dict[str, float] = {}
    image_export = work / IMAGE_RUN / "export"
    if not (image_export / "config.json").is_file():
        seconds["image_road"] = run_image_road(work, seed, progress)["seconds"]["total"]
    data = work / DATA
    t = time.perf_counter()
    try:
        made = write_posttrain(data, N_SFT, N_PREFERENCE, N_TEST, seed)
    except SyntheticTaskError as e:
        raise RoadError(f"post-training data: {e}") from None
    seconds["make_synthetic"] = time.perf_counter() - t
    curation = offline_curation(CURATION, data / "curation_synthetic_offline.yaml")
    sft_shards = run_stage("build_shards", build_shards.main, [made["sft"], str(work / SFT_SHARDS), "--config",
                                                               str(curation), "--json"])
    pref_shards = run_stage("build_shards", build_shards.main, [made["preference"], str(work / PREFERENCE_SHARDS),
                                                                "--config", str(curation), "--json"])
    seconds["build_shards"] = sft_shards.seconds + pref_shards.seconds

    # SFT, two seeds, and their average: two-image conversations and the single-image attribute questions
    multi = [json.loads(line) for line in Path(made["multi_image"]).read_text().splitlines()]
    root = Path(made["multi_image"]).parent
    questions, answers = Path(made["questions"]), Path(made["answers"])
    sft = {}
    for s in (seed, seed + 1):
        run = f"runs/synthetic/image_sft_seed{s}"
        stage = _train(POST_CONFIGS["sft"], work, s, progress, f"train.run_dir={work / run}")
        seconds[f"train_sft_seed{s}"] = stage.seconds
        sft[f"seed{s}"] = Path(stage.summary["export"])
    averaged = work / "runs/synthetic/image_sft_average"
    seconds["average"] = run_stage("average_checkpoints", average_checkpoints.main,
                                   [*map(str, sft.values()), "--out", str(averaged)]).seconds
    t = time.perf_counter()
    two_image, single_image = {}, {}
    for name, export in {**sft, "average": averaged, "pretrained": image_export}.items():
        two_image[name] = conversation_accuracy(multi, conversation_answers(export, multi, root))
        preds = work / "runs/synthetic/posttrain_answers" / f"{name}.jsonl"
        answer(export, questions, preds)
        single_image[name] = attribute_scores(answers, preds)["accuracy"]
    seconds["answer_sft"] = time.perf_counter() - t

    # reward model from the first SFT export
    sft_export = sft[f"seed{seed}"]
    reward = _train(POST_CONFIGS["reward"], work, seed, progress, f"model.init_from={sft_export}")
    seconds["train_reward"] = reward.seconds
    rm_eval = work / "runs/synthetic/reward/heldout"
    stage = run_stage("evaluate", evaluate.main, ["--checkpoint", reward.summary["export"], "--task", "preference",
                                                  "--data", made["pairs"], "--out", str(rm_eval)])
    seconds["evaluate_reward"] = stage.seconds
    rm_metrics = json.loads((rm_eval / "metrics.json").read_text())

    # DPO from an early image model
    early = _train(RUN_CONFIGS["image"], work, seed, progress, f"train.steps={EARLY_STEPS}",
                   f"train.run_dir={work / EARLY_RUN}", f"train.save_every={EARLY_STEPS}")
    dpo = _train(POST_CONFIGS["dpo"], work, seed, progress)
    seconds["train_early"], seconds["train_dpo"] = early.seconds, dpo.seconds
    attributes = {}
    for name, stage in (("before_dpo", early), ("after_dpo", dpo)):
        preds = Path(stage.summary["export"]).parent / "attribute_predictions.jsonl"
        seconds[f"answer_{name}"] = answer(Path(stage.summary["export"]), questions, preds).seconds
        attributes[name] = attribute_scores(answers, preds)
    return {
        "two_image_accuracy": {k: v["accuracy"] for k, v in two_image.items()},
        "two_image_by_kind": {k: v["by_kind"] for k, v in two_image.items()},
        "two_image_chance": 0.5,
        "single_image_accuracy": single_image,
        "average_minus_best_seed": {
            "two_image": two_image["average"]["accuracy"] - max(two_image[k]["accuracy"] for k in sft),
            "single_image": single_image["average"] - max(single_image[k] for k in sft)},
        "reward_pairwise_accuracy": rm_metrics["score"],
        "reward_heldout_pairs": rm_metrics["n"],
        "dpo": attributes,
        "hallucination_drop": (attributes["before_dpo"]["hallucination_rate"]
                               - attributes["after_dpo"]["hallucination_rate"]),
        "exports": {"sft": {k: str(v) for k, v in sft.items()}, "average": str(averaged),
                    "reward": reward.summary["export"], "early": early.summary["export"], "dpo": dpo.summary["export"]},
        "seconds": {k: round(v, 1) for k, v in seconds.items()} | {"total": round(sum(seconds.values()), 1)},
        "seed": seed,
    }


def summary(m: dict) -> str:
    two = ", ".join(f"{k} {v:.3f}" for k, v in m["two_image_accuracy"].items())
    one = ", ".join(f"{k} {v:.3f}" for k, v in m["single_image_accuracy"].items())
    b, a = m["dpo"]["before_dpo"], m["dpo"]["after_dpo"]
    gap = m["average_minus_best_seed"]
    return "\n".join([
        f"post-training road (seed {m['seed']}):",
        f"  two-image conversations, held-out accuracy: {two} (choosing one of the two scenes: "
        f"{m['two_image_chance']})",
        f"  single-image colour / shape questions: {one}; average - best seed: two-image {gap['two_image']:+.3f}, "
        f"single-image {gap['single_image']:+.3f}",
        f"  reward model: held-out pairwise accuracy {m['reward_pairwise_accuracy']:.3f} "
        f"({m['reward_heldout_pairs']} pairs)",
        f"  DPO: hallucination rate {b['hallucination_rate']:.3f} -> {a['hallucination_rate']:.3f}, accuracy "
        f"{b['accuracy']:.3f} -> {a['accuracy']:.3f} ({a['n']} colour / shape questions)",
        f"  exports: {shown_path(m['exports']['average'])}, {shown_path(m['exports']['dpo'])}"])
