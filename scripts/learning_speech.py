"""The speech learning proof on the production road (``python -m scripts.bench_learning speech``).

    metrics = run_speech_road("runs/proof", seed=0)   # WER, CER, exact match, no-audio baseline, seconds

Every stage is one of the project's commands, run in this process through its ``main(argv)`` exactly as
``python -m scripts.<name> ...`` runs it, on the paths the checked-in configs name, rooted at the work dir:

1. ``make_synthetic spoken-digits out/synthetic/spoken-digits --n-train 2000 --n-test 100 --seed S``: espeak-ng
   clips with sidecar transcripts (train/), the held-out questions and answer key (test/), the tiny tokenizer
   and the LM's text-only ASR dialogs (lm/, `synthetic.dialogs`);
2. ``build_audio_shards OUT/train OUT/shards --config configs/audio_curation_synthetic.yaml``;
3. ``train --config configs/run_text_speech_synthetic.yaml``: the tiny LM pre-trained on the dialogs (kind
   text, data.format dialog), exported in Meta's layout;
4. ``train_speech_adapter --config configs/run_speech_synthetic.yaml``: a random Conformer encoder + speech
   adapter in front of that LM, frozen; exports a speech checkpoint;
5. ``demo_asr --checkpoint RUN/export --questions OUT/test/questions.jsonl --out predictions.jsonl``;
6. ``make_synthetic score OUT/test/answers.jsonl predictions.jsonl``: WER, CER, exact match.

The no-audio baseline takes the same road from step 4 on with zero training steps: the model the speech run
starts from (same factory, config and seed: the frozen LM behind an untrained encoder + adapter) is written
by the kind's exporter, then transcribed by demo_asr and scored. Its audio positions carry nothing the LM
can read, so its answers are the frozen LM alone on the ASR prompt.

The work dir must be new or empty (make_synthetic refuses to mix runs; the trainer would resume).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from scripts._road import export_untrained, run_stage, set_args

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TEXT_CONFIG = CONFIGS / "run_text_speech_synthetic.yaml"
SPEECH_CONFIG = CONFIGS / "run_speech_synthetic.yaml"
CURATION_CONFIG = CONFIGS / "audio_curation_synthetic.yaml"
N_EXAMPLES = 5  # transcripts shown in the result


@dataclass(frozen=True)
class Road:
    """The road's paths: those of the checked-in configs, rooted at ``work``."""

    work: Path

    def config(self, path: Path, overrides: list[str]):
        from training.config import load_run_config

        return load_run_config(path, overrides)

    def path_overrides(self, config: Path) -> list[str]:
        """``--set`` values rooting the config's relative paths (tokenizer, LM, shards, run dir) at ``work``."""
        cfg = self.config(config, [])
        keys = {"model.tokenizer": cfg.model.tokenizer, "model.lm": cfg.model.lm, "data.shards": cfg.data.shards,
                "train.run_dir": cfg.train.run_dir}
        return [f"{k}={self.work / v}" for k, v in keys.items() if v]

    @property
    def data(self) -> Path:
        """make_synthetic's OUT: where the text config finds the tokenizer."""
        return self.work / Path(self.config(TEXT_CONFIG, []).model.tokenizer).parent

    @property
    def shards(self) -> Path:
        return self.work / Path(self.config(SPEECH_CONFIG, []).data.shards).parent

    @property
    def speech_run(self) -> Path:
        return self.work / self.config(SPEECH_CONFIG, []).train.run_dir


def transcribe_and_score(checkpoint: Path, data: Path, out: Path) -> tuple[dict, float, float]:
    """demo_asr over the held-out questions into ``out``, then the scorer: (metrics, seconds, seconds)."""
    from scripts import demo_asr, make_synthetic

    asr = run_stage("demo_asr", demo_asr.main, ["--checkpoint", str(checkpoint), "--questions",
                                                str(data / "test" / "questions.jsonl"), "--out", str(out)])
    score = run_stage("make_synthetic", make_synthetic.main,
                      ["score", str(data / "test" / "answers.jsonl"), str(out), "--json"])
    return score.summary, asr.seconds, score.seconds


def examples(answers: Path, predictions: Path, n: int = N_EXAMPLES) -> list[dict]:
    """The first ``n`` held-out transcripts: reference, hypothesis, right (exact match as the scorer has it)."""
    from synthetic.score import normalize_answer, read_rows

    refs, hyps = read_rows(answers, ("answer",)), read_rows(predictions, ("answer",))
    return [{"id": i, "ref": r["answer"], "hyp": hyps[i]["answer"],
             "right": normalize_answer(r["answer"]) == normalize_answer(hyps[i]["answer"])}
            for i, r in list(refs.items())[:n]]


def run_speech_road(work: str | Path, seed: int, n_train: int = 2000, n_test: int = 100,
                    steps: int | None = None, lm_steps: int | None = None, progress: bool = True) -> dict:
    """The road of the module docstring under ``work``; ``steps`` / ``lm_steps`` override the configs'
    train.steps (adapter / LM). Returns the metrics, the seconds of each stage and where things are."""
    from scripts import build_audio_shards, make_synthetic, train, train_speech_adapter

    road = Road(Path(work))
    data, seconds = road.data, {}
    made = run_stage("make_synthetic", make_synthetic.main,
                     ["spoken-digits", str(data), "--n-train", str(n_train), "--n-test", str(n_test),
                      "--seed", str(seed), "--json"])
    seconds["synth"] = made.seconds
    built = run_stage("build_audio_shards", build_audio_shards.main,
                      [str(data / "train"), str(road.shards), "--config", str(CURATION_CONFIG), "--json"])
    seconds["shards"] = built.seconds

    common = [f"model.seed={seed}", f"data.seed={seed}", f"train.progress={str(progress).lower()}"]
    text_set = [*road.path_overrides(TEXT_CONFIG), *common, *([f"train.steps={lm_steps}"] if lm_steps else [])]
    lm = run_stage("train", train.main, ["--config", str(TEXT_CONFIG), *set_args(text_set)])
    seconds["lm_pretrain"] = lm.seconds
    speech_set = [*road.path_overrides(SPEECH_CONFIG), *common, *([f"train.steps={steps}"] if steps else [])]
    adapter = run_stage("train_speech_adapter", train_speech_adapter.main,
                        ["--config", str(SPEECH_CONFIG), *set_args(speech_set)])
    seconds["train"] = adapter.seconds

    checkpoint, run = Path(adapter.summary["export"]), road.speech_run
    scored, seconds["transcribe"], seconds["score"] = transcribe_and_score(checkpoint, data, run / "predictions.jsonl")
    t = time.perf_counter()
    untrained = export_untrained(SPEECH_CONFIG, speech_set, run / "untrained_export")
    seconds["export_untrained"] = time.perf_counter() - t
    no_audio, seconds["transcribe_no_audio"], _ = transcribe_and_score(untrained, data,
                                                                       run / "no_audio_predictions.jsonl")
    answers = data / "test" / "answers.jsonl"
    return {
        "heldout_wer": scored["wer"], "heldout_cer": scored["cer"], "heldout_exact_match": scored["accuracy"],
        "no_audio_wer": no_audio["wer"], "no_audio_cer": no_audio["cer"],
        "no_audio_exact_match": no_audio["accuracy"],
        "examples": examples(answers, run / "predictions.jsonl"),
        "no_audio_examples": examples(answers, run / "no_audio_predictions.jsonl", 3),
        "seed": seed, "n_train": n_train, "n_test": n_test, "kept_clips": built.summary["counts"]["kept"],
        "lm_steps": lm.summary["last_step"], "lm_final_loss": lm.summary["last_loss"],
        "steps": adapter.summary["last_step"], "final_loss": adapter.summary["last_loss"],
        "seconds": {k: round(v, 1) for k, v in seconds.items()} | {"total": round(sum(seconds.values()), 1)},
        "checkpoint": str(checkpoint), "predictions": str(run / "predictions.jsonl"), "work_dir": str(road.work),
    }


def summary(metrics: dict) -> str:
    """A few held-out transcripts, right or wrong, and the WER beside the no-audio baseline's."""
    lines = [f"  {e['ref']!r:<28} -> {e['hyp']!r:<28} {'right' if e['right'] else 'wrong'}"
             for e in metrics["examples"]]
    return "\n".join([
        f"held-out spoken digits (seed {metrics['seed']}, {metrics['n_test']} clips), reference -> transcript:",
        *lines,
        f"WER {metrics['heldout_wer']:.3f}, CER {metrics['heldout_cer']:.3f}, exact "
        f"{metrics['heldout_exact_match']:.2f}; no audio (the frozen LM alone): WER {metrics['no_audio_wer']:.3f}",
        f"checkpoint: {metrics['checkpoint']}"])
