"""The ``bestrq`` kind through the one trainer: espeak-ng speech -> audio shards (the real builder) -> a
tiny Conformer pre-trained with BEST-RQ in one CPU process (bf16, fp32 gradient accumulation, ZeRO-1, two
micro-batches per step) -> the speech-encoder export the speech kind's ``model.encoder_from`` loads; exact
resume, the codec's crops, and the named errors."""

import io
import json
import math
import re
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from common.config import config_to_dict
from data_curation.audio_shards import AudioCurationConfig, build_audio_shards
from scripts import train as train_script
from speech.conformer import conformer_config
from speech.pretrain import load_bestrq, load_pretrained_encoder
from training.bestrq import BestRQCodec, BestRQTask
from training.config import TrainConfigError, load_run_config
from training.data import BadSampleError, RawSample
from training.trainer import build_model, train
from tests.system_deps import require_binary
from tests.tiny import build_tiny_tokenizer
from tests.training.test_trainer import copy_run

SENTENCES = [
    "the quick brown fox jumps over the lazy dog", "she sells sea shells by the sea shore",
    "how much wood would a woodchuck chuck", "peter piper picked a peck of pickled peppers",
    "a stitch in time saves nine", "all that glitters is not gold", "the early bird catches the worm",
    "actions speak louder than words", "beauty is in the eye of the beholder",
    "every cloud has a silver lining", "fortune favours the bold", "practice makes perfect",
]
STEPS = 40
DS = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "bf16": {"enabled": True},
      "data_types": {"grad_accum_dtype": "fp32"}, "zero_optimization": {"stage": 1}, "gradient_clipping": 1.0,
      "steps_per_print": 1000000}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """12 espeak-ng utterances through the audio shard builder: 3 shards of key.flac (+ transcript)."""
    espeak = require_binary("espeak-ng")  # pre-training on real speech
    wavs, out = tmp_path_factory.mktemp("wavs"), tmp_path_factory.mktemp("shards")
    for i, text in enumerate(SENTENCES):
        subprocess.run([espeak, "-w", str(wavs / f"u{i:02d}.wav"), "-v", "en-us", text], check=True,
                       capture_output=True)
        (wavs / f"u{i:02d}.txt").write_text(text)
    built = build_audio_shards(wavs, out, AudioCurationConfig(samples_per_shard=5, workers=1), progress=False)
    assert built.counts == {"kept": 12, "dropped": 0, "error": 0}
    (out / "ds.json").write_text(json.dumps(DS))
    return out


def run_cfg(shards: Path, run_dir: Path, *extra: str):
    """The shipped synthetic config with this test's paths, a shorter run and 4 codebooks of 256 codes."""
    return load_run_config(Path("configs/run_bestrq_synthetic.yaml"), [
        f"data.shards={shards}/shard_*.tar", f"deepspeed={shards / 'ds.json'}", f"train.run_dir={run_dir}",
        "train.progress=false", f"train.steps={STEPS}", "train.save_every=20", "train.log_every=10",
        "data.max_rows=4", "data.shuffle_buffer=12", "optim.warmup=5", *extra])


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    cfg = run_cfg(shards, tmp_path_factory.mktemp("bestrq") / "run")
    return cfg, train(cfg)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]


def test_loss_falls_and_masked_prediction_beats_chance(trained):
    cfg, result = trained
    log = records(result.run_dir)
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    loss, acc = [r["loss"] for r in log], [r["accuracy"] for r in log]
    assert loss == [result.losses[s] for s in range(1, STEPS + 1)]
    assert np.mean(loss[:3]) == pytest.approx(math.log(256), rel=0.1)  # chance at the start
    assert np.mean(loss[-5:]) < 0.8 * np.mean(loss[:3]), loss
    assert np.mean(acc[-5:]) > max(2 * np.mean(acc[:3]), 5 / 256), acc  # well above chance (1/256)
    assert log[-1]["target_perplexity"] > 10  # normalised speech spreads over many codes
    assert all(0.2 < r["masked_fraction"] < 0.9 for r in log)
    assert log[-1]["lr"] < 0.05 * cfg.optim.lr  # cosine to min_lr_ratio 0
    assert log[0]["tokens"] == 0 and (result.run_dir / "tensorboard").is_dir()  # no text read


def test_export_is_the_encoder_the_speech_kind_loads(trained, shards):
    cfg, result = trained
    report = json.loads((result.export_dir / "report.json").read_text())
    assert all(Path(f).is_file() for f in report["files"].values())
    assert report["loss"] == [r["loss"] for r in records(result.run_dir)] and report["steps"] == STEPS
    assert report["chance_loss"] == pytest.approx(math.log(256)) and report["config"] == json.loads(
        json.dumps(config_to_dict(cfg)))
    bestrq, encoder = load_bestrq(result.export_dir), load_pretrained_encoder(result.export_dir)
    assert encoder.cfg == conformer_config("tiny") and (bestrq.cfg.n_codebooks, bestrq.cfg.codebook_size) == (4, 256)
    fresh = build_model(cfg, None)  # same seed: the weights the run started from
    start = fresh.encoder.state_dict()
    moved = [k for k, v in bestrq.encoder.state_dict().items() if not torch.equal(v, start[k])]
    assert len(moved) > 0.9 * len(start)  # the encoder trained
    for name, value in encoder.state_dict().items():
        assert torch.equal(value, bestrq.encoder.state_dict()[name]), name
    tok = build_tiny_tokenizer(result.run_dir, texts=SENTENCES)
    speech = build_model(load_run_config(Path("configs/run_speech_synthetic.yaml"), [
        "model.lm=null", f"model.tokenizer={result.run_dir / 'tokenizer.model'}",
        f"model.encoder_from={result.export_dir}"]), tok)
    for name, value in encoder.state_dict().items():
        assert torch.equal(speech.encoder.state_dict()[name], value), name


def test_resume_continues_with_the_uninterrupted_losses_and_metrics(trained, tmp_path):
    cfg, result = trained
    copy_run(result.run_dir, tmp_path / "run", "step_20")
    resumed = train(replace(cfg, train=replace(cfg.train, run_dir=str(tmp_path / "run"), export=False)))
    assert sorted(resumed.losses) == list(range(21, STEPS + 1))
    def without_speed(run_dir: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "steps_per_s"} for r in records(run_dir)]

    assert without_speed(tmp_path / "run") == without_speed(result.run_dir)  # loss, accuracy, ... per step


def wav_bytes(n: int, fmt: str = "FLAC") -> bytes:
    buf = io.BytesIO()
    x = 0.1 * np.random.default_rng(n).standard_normal(n)
    sf.write(buf, x.astype(np.float32), 16_000, format=fmt)
    return buf.getvalue()


def raw(members: dict[str, bytes], epoch: int = 0, key: str = "k") -> RawSample:
    return RawSample("/somewhere/shard_00000.tar", key, members, epoch, 0)


def test_codec_crops_long_clips_by_sample_and_epoch_and_pads_batches():
    codec = BestRQCodec(crop_seconds=0.5, seed=3)
    long, short = wav_bytes(16_000), wav_bytes(4_000, "WAV")
    crops = [BestRQCodec(0.5, 3).decode(raw({"flac": long}, epoch)).media for epoch in (0, 0, 1)]
    assert all(len(c) == 8000 for c in crops)
    assert torch.equal(crops[0], crops[1]) and not torch.equal(crops[0], crops[2])  # resume-stable, per epoch
    moved = RawSample("/elsewhere/shard_00000.tar", "k", {"flac": long}, 0, 0)
    assert torch.equal(codec.decode(moved).media, crops[0])  # the shard's name, not its path
    kept = codec.decode(raw({"wav": short}))
    assert len(kept.media) == 4000 and kept.tokens == kept.labels == []
    batch = codec.collate([kept, codec.decode(raw({"flac": long}))])
    assert batch["waves"].shape == (2, 8000) and batch["wave_lengths"].tolist() == [4000, 8000]
    assert not batch["waves"][0, 4000:].any()
    out = BestRQTask(build_model(load_run_config(None, ["kind=bestrq", "model.bestrq.codebook_size=64"]), None))(
        torch.zeros(2, 0), torch.zeros(2, 0), **batch)
    assert set(out) == {"loss", "accuracy", "target_perplexity", "masked_fraction"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.values())
    with pytest.raises(ValueError, match="data.crop_seconds"):
        BestRQCodec(crop_seconds=1e-6, seed=0)


def test_bad_samples_and_shards_are_named(shards, tmp_path, capsys):
    codec = BestRQCodec(crop_seconds=60.0, seed=0)
    with pytest.raises(BadSampleError, match=re.escape("shard_00000.tar: sample k has no audio")):
        codec.decode(raw({"txt": b"hello"}))
    with pytest.raises(BadSampleError, match=re.escape("shard_00000.tar: sample k.flac:")):
        codec.decode(raw({"flac": b"fLaC" + bytes(range(256)) * 8}))
    # Through the entry point: a truncated shard exits 2 naming it, before any step.
    good = (shards / "shard_00000.tar").read_bytes()
    (tmp_path / "shard_00000.tar").write_bytes(good[: len(good) // 2])
    cfg = run_cfg(tmp_path, tmp_path / "run", f"deepspeed={shards / 'ds.json'}")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(config_to_dict(cfg)))))
    assert train_script.main(["--config", str(tmp_path / "run.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'shard_00000.tar'}: unreadable or truncated tar" in err or \
        f"{tmp_path / 'shard_00000.tar'}: truncated tar" in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_config_names_the_bad_key():
    with pytest.raises(TrainConfigError, match=r"model.bestrq: BestRQConfig.mask_prob must be in \(0, 1\)"):
        load_run_config(None, ["kind=bestrq", "model.bestrq.mask_prob=1.5"])
    with pytest.raises(TrainConfigError, match="unknown key model.bestrq.codebooks"):
        load_run_config(None, ["kind=bestrq", "model.bestrq.codebooks=4"])
    with pytest.raises(TrainConfigError, match="data.crop_seconds: -1.0 must be > 0"):
        load_run_config(None, ["kind=bestrq", "data.crop_seconds=-1"])
    with pytest.raises(TrainConfigError, match="parallel: pipeline lays out the image model only"):
        load_run_config(None, ["kind=bestrq", "parallel=pipeline"])
    from training.spec import TrainError

    with pytest.raises(TrainError, match=r"model.preset 'huge' / model.bestrq: .*huge"):
        build_model(load_run_config(None, ["kind=bestrq", "model.preset=huge"]), None)
    with pytest.raises(TrainError, match="n_mels differ"):
        build_model(load_run_config(None, ["kind=bestrq", "model.bestrq.n_mels=40"]), None)
