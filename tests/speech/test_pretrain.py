"""BEST-RQ pre-training end to end: espeak-ng speech -> audio shards (the real builder) -> tiny encoder
trained through `speech.pretrain` and the CLI -> saved encoder loaded strictly; plus the named errors."""

import io
import json
import math
import re
import shutil
import subprocess
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters.checkpoint import CheckpointError
from data_curation.audio_shards import AudioCurationConfig, build_audio_shards
from scripts import pretrain_speech_encoder as cli
from speech.audio import load_audio
from speech.bestrq import BestRQConfig
from speech.conformer import ConformerEncoder
from speech.features import LogMel, LogMelConfig
from speech.pretrain import (AudioClips, AudioSourceError, PretrainConfig, load_bestrq,
                             load_pretrained_encoder, pad_waves, read_encoder_config, save_pretrained,
                             train_bestrq)
from tests.system_deps import require_binary

SENTENCES = [
    "the quick brown fox jumps over the lazy dog", "she sells sea shells by the sea shore",
    "how much wood would a woodchuck chuck", "peter piper picked a peck of pickled peppers",
    "a stitch in time saves nine", "all that glitters is not gold", "the early bird catches the worm",
    "actions speak louder than words", "beauty is in the eye of the beholder",
    "every cloud has a silver lining", "fortune favours the bold", "practice makes perfect",
]
# 4 codebooks of 256 codes instead of 16 x 8,192: the loss is still a real BEST-RQ loss, at CPU-test cost.
CFG = PretrainConfig(preset="tiny", steps=60, batch_size=4, lr=2e-3, warmup=5, log_every=10,
                     bestrq=BestRQConfig(n_codebooks=4, codebook_size=256))
TINY_CLI = ["--preset", "tiny", "--steps", "3", "--batch-size", "2", "--warmup", "1", "--codebooks", "2",
            "--codebook-size", "64", "--no-progress"]


@pytest.fixture(scope="module")
def wavs(tmp_path_factory) -> Path:
    """espeak-ng utterances (22.05 kHz WAV) with transcript sidecars: the shard builder's folder input."""
    espeak = require_binary("espeak-ng")  # these tests pre-train on real speech
    root = tmp_path_factory.mktemp("wavs")
    for i, text in enumerate(SENTENCES):
        subprocess.run([espeak, "-w", str(root / f"u{i:02d}.wav"), "-v", "en-us", text], check=True,
                       capture_output=True)
        (root / f"u{i:02d}.txt").write_text(text)
    return root


@pytest.fixture(scope="module")
def shards(wavs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    built = build_audio_shards(wavs, out, AudioCurationConfig(samples_per_shard=5, workers=1), progress=False)
    assert built.counts == {"kept": 12, "dropped": 0, "error": 0}  # every clip passes the VAD
    return out


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    model, report = train_bestrq(AudioClips.from_shards(shards), CFG, progress=False, device="cpu")
    return model, report, save_pretrained(model, CFG.features, tmp_path_factory.mktemp("run"))


def mel_batch(clips: AudioClips, n: int = 3):
    wave, lengths = pad_waves([clips.load(i, None, np.random.default_rng(0)) for i in range(n)])
    return LogMel()(wave, lengths)


# --- data ------------------------------------------------------------------------------------------

def test_shards_index_every_flac_member_and_decode_it(shards):
    clips = AudioClips.from_shards(shards)
    assert len(clips) == 12 and [Path(c.path).name for c in clips] == ["shard_00000.tar"] * 5 + [
        "shard_00001.tar"] * 5 + ["shard_00002.tar"] * 2
    assert re.fullmatch(r".*shard_00000\.tar:u00\.flac", clips[0].name)
    report = json.loads((shards / "report.json").read_text())
    assert clips.hours == pytest.approx(report["stats_kept"]["hours"], abs=1e-3)
    with tarfile.open(shards / "shard_00001.tar") as tf:
        ref = load_audio(tf.extractfile("u07.flac").read(), max_seconds=None).samples
    got = clips.load(7, None, np.random.default_rng(0))
    assert got.dtype == np.float32 and np.array_equal(got, ref)
    # The same clips through a glob, a list and the folder reader.
    assert len(AudioClips.from_shards(str(shards / "shard_*.tar"))) == 12
    assert len(AudioClips.from_shards([shards / "shard_00002.tar"])) == 2


def test_folder_source_and_random_crop(wavs):
    clips = AudioClips.from_folder(wavs)
    assert len(clips) == 12 and clips[0].duration_s > 1.0
    full = clips.load(0, None, np.random.default_rng(0))
    assert len(full) == round(clips[0].duration_s * 16_000)  # 22.05 kHz -> 16 kHz
    rng = np.random.default_rng(0)
    crops = [clips.load(0, 0.5, rng) for _ in range(4)]
    starts = set()
    for crop in crops:
        assert len(crop) == 8000
        start = next(s for s in range(len(full) - 7999) if np.array_equal(full[s : s + 8000], crop))
        starts.add(start)
    assert len(starts) > 1  # random, not always the first half second


def test_empty_inputs_are_named_errors(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AudioSourceError, match=re.escape(f"{empty}: no *.tar shards")):
        AudioClips.from_shards(empty)
    with pytest.raises(AudioSourceError, match=re.escape(f"{empty}: no audio files")):
        AudioClips.from_folder(empty)
    with pytest.raises(AudioSourceError, match="no shards match"):
        AudioClips.from_shards(str(tmp_path / "missing_*.tar"))
    with tarfile.open(empty / "texts.tar", "w") as tf:  # a shard with no audio member
        info = tarfile.TarInfo("a.txt")
        tf.addfile(info, io.BytesIO(b""))
    with pytest.raises(AudioSourceError, match=re.escape(f"{empty}: no .flac member in 1 shard")):
        AudioClips.from_shards(empty)
    assert cli.main(["--audio-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"pretrain_speech_encoder: {tmp_path / 'nowhere'}: not a folder"
    assert cli.main(["--shards", str(empty), "--out", str(tmp_path / "o"), "--preset", "huge"]) == 2
    assert "huge" in capsys.readouterr().err and not (tmp_path / "o").exists()


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_corrupt_member_or_tar_is_named(shards, tmp_path, capsys):
    with tarfile.open(shards / "shard_00002.tar") as tf:
        good = tf.extractfile("u10.flac").read()
    garbage = _tar(tmp_path / "garbage.tar", {"good.flac": good, "bad.flac": b"fLaC" + bytes(range(256)) * 8})
    with pytest.raises(AudioSourceError, match=re.escape(f"{garbage}:bad.flac: not readable as audio")):
        AudioClips.from_shards(garbage)
    # A cut FLAC: its header may pass indexing, its frames do not decode. Either way the member is named.
    cut = _tar(tmp_path / "cut.tar", {"good.flac": good, "cut.flac": good[: len(good) // 2]})
    with pytest.raises(AudioSourceError, match=re.escape(f"{cut}:cut.flac")):
        clips = AudioClips.from_shards(cut)
        for i in range(len(clips)):
            clips.load(i, None, np.random.default_rng(0))
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(garbage.read_bytes()[:700])  # inside the first member's data
    with pytest.raises(AudioSourceError, match=re.escape(f"{truncated}: unreadable or truncated tar")):
        AudioClips.from_shards(truncated)
    assert cli.main(["--shards", str(garbage), "--out", str(tmp_path / "o"), *TINY_CLI]) == 2
    assert capsys.readouterr().err.startswith(f"pretrain_speech_encoder: {garbage}:bad.flac:")


# --- training --------------------------------------------------------------------------------------

def test_loss_falls_on_real_speech(trained):
    _, report, _ = trained
    loss, acc = report["loss"], report["accuracy"]
    assert len(loss) == 60 and report["clips"] == 12 and report["clips_seen"] == 240
    assert np.mean(loss[:5]) == pytest.approx(math.log(256), rel=0.1)  # chance at the start
    assert np.mean(loss[-5:]) < 0.8 * np.mean(loss[:5]), loss
    assert np.mean(acc[-5:]) > 2 * np.mean(acc[:5]), acc
    assert report["target_perplexity"][-1] > 10  # normalised speech spreads over many codes
    assert [e["step"] for e in report["log"]] == [10, 20, 30, 40, 50, 60]
    assert report["log"][-1]["lr"] < 0.01 * CFG.lr  # cosine decay to 0


def test_saved_encoder_loads_strictly_and_matches_the_trained_one(trained, shards):
    model, _, out = trained
    assert read_encoder_config(out) == (model.encoder.cfg, model.cfg, LogMelConfig())
    encoder = load_pretrained_encoder(out)
    assert isinstance(encoder, ConformerEncoder) and not encoder.training
    assert set(load_file(out / "encoder.safetensors")) == set(ConformerEncoder(encoder.cfg).state_dict())
    mel, frames = mel_batch(AudioClips.from_shards(shards))
    with torch.no_grad():
        h, lengths = encoder(mel, frames)
        ref, ref_lengths = model.encoder(mel, frames)
    assert torch.equal(h, ref) and torch.equal(lengths, ref_lengths)
    # The whole BEST-RQ state (heads, frozen quantizer) comes back too: same loss on the same masks.
    resumed = load_bestrq(out)
    with torch.no_grad():
        a = resumed(mel, frames, generator=torch.Generator().manual_seed(1))
        b = model(mel, frames, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["targets"], b["targets"])


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["encoder"].update(dim_typo=3), "encoder: unknown keys ['dim_typo']"),
    (lambda m: m["bestrq"].pop("codebook_size"), "bestrq: unknown keys [], missing keys ['codebook_size']"),
    (lambda m: m.update(extra=1), "unknown keys ['extra']"),
    (lambda m: m.update(format="llama3-speech/1"), "format 'llama3-speech/1'"),
    (lambda m: m["encoder"].update(n_heads=5), "n_heads 5 must divide dim 64"),
])
def test_bad_checkpoint_config_is_a_checkpoint_error(trained, tmp_path, edit, message):
    out = shutil.copytree(trained[2], tmp_path / "ckpt")
    meta = json.loads((out / "encoder_config.json").read_text())
    edit(meta)
    (out / "encoder_config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=re.escape(f"{out / 'encoder_config.json'}")) as e:
        load_pretrained_encoder(out)
    assert message in str(e.value)


def test_bad_checkpoint_weights_are_named(trained, tmp_path):
    out = shutil.copytree(trained[2], tmp_path / "ckpt")
    sd = load_file(out / "encoder.safetensors")
    save_file({**sd, "heads.0.weight": torch.zeros(1)}, str(out / "encoder.safetensors"))
    weights = out / "encoder.safetensors"
    with pytest.raises(CheckpointError, match=re.escape(f"{weights}: unknown keys ['heads.0")):
        load_pretrained_encoder(out)
    (out / "encoder.safetensors").unlink()
    with pytest.raises(CheckpointError, match="not found"):
        load_pretrained_encoder(out)


def test_cli_trains_saves_and_prints_the_report(shards, wavs, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["--shards", str(shards), "--out", str(out), "--seed", "3", *TINY_CLI]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads((out / "report.json").read_text())
    assert (report["steps"], report["clips"], report["seed"]) == (3, 12, 3)
    bestrq = report["config"]["bestrq"]
    assert (bestrq["n_codebooks"], bestrq["codebook_size"]) == (2, 64)
    assert all(Path(f).is_file() for f in report["files"].values())
    assert load_pretrained_encoder(out).cfg == load_bestrq(out).encoder.cfg
    assert cli.main(["--audio-dir", str(wavs), "--out", str(tmp_path / "run2"), *TINY_CLI]) == 0
    assert json.loads(capsys.readouterr().out)["source"] == str(wavs)


def test_in_memory_clips():
    waves = [np.random.default_rng(i).standard_normal(16_000 + 3_000 * i, np.float32) for i in range(3)]
    cfg = replace(CFG, steps=2, batch_size=2, bestrq=BestRQConfig(n_codebooks=2, codebook_size=64))
    model, report = train_bestrq(waves, cfg, progress=False, device="cpu")
    assert report["clips"] == 3 and report["source"] == "<arrays>" and len(report["loss"]) == 2
    assert not model.training
    with pytest.raises(AudioSourceError, match=re.escape("<array 1>: shape (0,)")):
        AudioClips.from_arrays([waves[0], np.zeros(0)])


@pytest.mark.parametrize("field, value", [("steps", 0), ("batch_size", 0), ("lr", 0.0), ("max_seconds", 0.0)])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field if field != "lr" else "lr > 0"):
        PretrainConfig(**{field: value})
