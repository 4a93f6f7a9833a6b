"""Speech curation on real espeak-ng speech, silence, noise, a tone, clipped, short, long, stereo 44.1 kHz and
corrupt files: the VAD score (checked against silero's own segmenter), then the audio shard builder end to end
(a status for every input, 16 kHz mono FLAC in readable shards, report, resume, named errors)."""

import io
import json
import socket
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import soxr
import torch
import yaml

from data_curation.audio_shards import (AudioCurationConfig, build_audio_shards, load_audio_config,
                                        open_audio_input)
from data_curation.curation_config import ConfigError
from data_curation.input_files import CurationInputError
from data_curation.shard_jobs import StageSetupError
from data_curation.vad import VadConfig, VadLoadError, VoiceActivity
from media.audio import load_audio, write_audio
from scripts import build_audio_shards as cli
from tests.system_deps import require_binary

SR = 16_000
TEXTS = {
    "fox": "The quick brown fox jumps over the lazy dog and runs into the forest.",
    "weather": "Tomorrow will be sunny in the morning, with light rain in the afternoon.",
    "hello": "Hello world.",
}
EXPECTED = {  # key -> (status, stage)
    "fox": ("ok", None), "weather_flac": ("ok", None), "hello_ogg": ("ok", None), "stereo44k": ("ok", None),
    "silence": ("dropped", "silence"), "noise": ("dropped", "vad"), "hum": ("dropped", "vad"),
    "clipped": ("dropped", "clipping"), "short": ("dropped", "duration"), "long": ("dropped", "duration"),
    "emptytext": ("dropped", "text"), "corrupt": ("error", "decode"), "notext": ("error", "read"),
    "orphan_txt": ("error", "read"),
}
KEPT = {k for k, (status, _) in EXPECTED.items() if status == "ok"}


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> dict[str, np.ndarray]:
    """Real synthetic speech: espeak-ng's 22.05 kHz WAVs, as float32 mono at 16 kHz."""
    espeak = require_binary("espeak-ng")
    root = tmp_path_factory.mktemp("espeak")
    out = {}
    for key, text in TEXTS.items():
        subprocess.run([espeak, "-w", str(root / f"{key}.wav"), text], check=True, capture_output=True)
        out[key] = load_audio(root / f"{key}.wav").samples
    return out


@pytest.fixture(scope="module")
def vad() -> VoiceActivity:
    return VoiceActivity(VadConfig())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, speech) -> Path:
    root = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(0)
    t = np.arange(3 * SR) / SR
    stereo = soxr.resample(speech["weather"], SR, 44_100)
    files = {  # key -> (file name, samples, rate)
        "fox": ("fox.wav", speech["fox"], SR),
        "weather_flac": ("weather_flac.flac", speech["weather"], SR),
        "hello_ogg": ("hello_ogg.ogg", speech["hello"], SR),
        "stereo44k": ("stereo44k.wav", np.stack([stereo, 0.5 * stereo], 1), 44_100),
        "silence": ("silence.wav", np.zeros(3 * SR, np.float32), SR),
        "noise": ("noise.wav", 0.1 * rng.standard_normal(3 * SR), SR),
        "hum": ("hum.flac", 0.2 * np.sin(2 * np.pi * 220 * t) + 0.1 * np.sin(2 * np.pi * 660 * t), SR),
        "clipped": ("clipped.wav", np.clip(20 * speech["fox"], -1, 1), SR),
        "short": ("short.wav", speech["fox"][SR // 10: SR // 10 + SR // 4], SR),
        "long": ("long.wav", np.tile(speech["fox"], 20)[: 61 * SR], SR),
        "emptytext": ("emptytext.wav", speech["hello"], SR),
        "notext": ("notext.wav", speech["hello"], SR),
    }
    transcripts = {"fox": TEXTS["fox"], "weather_flac": TEXTS["weather"], "hello_ogg": TEXTS["hello"],
                   "stereo44k": TEXTS["weather"], "emptytext": "  \n", "notext": None}
    for key, (name, samples, rate) in files.items():
        write_audio(root / name, samples, rate)
        if transcripts.get(key, "") is not None:
            (root / f"{key}.txt").write_text(transcripts.get(key, f"Transcript of the {key} clip."))
    (root / "fox.json").write_text(json.dumps({"speaker": "espeak"}))  # metadata beside the .txt
    (root / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + rng.bytes(3000))
    (root / "corrupt.txt").write_text("A file that is not audio.")
    (root / "orphan.txt").write_text("A transcript without its audio.")
    return root


def _config(tmp_path: Path, **over) -> AudioCurationConfig:
    path = tmp_path / "audio.yaml"
    path.write_text(yaml.safe_dump({"samples_per_shard": 4, "workers": 1, **over}))
    return load_audio_config(path)


def _statuses(out: Path) -> dict[str, dict]:
    return {r["key"]: r for f in sorted(out.glob("shard_*.parquet")) for r in pq.read_table(f).to_pylist()}


def _tar_members(out: Path) -> dict[str, bytes]:
    members = {}
    for path in sorted(out.glob("shard_*.tar")):
        with tarfile.open(path) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    return members


@pytest.fixture(scope="module")
def built(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("built") / "out"
    return build_audio_shards(corpus, out, _config(tmp_path_factory.mktemp("cfg")), progress=False)


# ------------------------------------------------------------------------------------------------- VAD


def test_vad_loads_the_packaged_model_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the VAD tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(torch.hub, "load", no_network)
    assert hasattr(VoiceActivity(VadConfig()).model, "audio_forward")


def test_vad_score_is_the_speech_fraction_of_silero_segments(speech, vad):
    from silero_vad import get_speech_timestamps

    for key, x in speech.items():
        result = vad.analyze(x)
        # the reference: silero's own window-by-window segmenter on the same clip
        ref = get_speech_timestamps(torch.from_numpy(x), vad.model, sampling_rate=SR)
        assert result.score == pytest.approx(sum(s["end"] - s["start"] for s in ref) / len(x), abs=1e-9)
        assert [(round(a * SR), round(b * SR)) for a, b in result.segments] == [(r["start"], r["end"]) for r in ref]
        assert result.score > 0.7 and 0 < result.mean_prob < 1, key
        assert vad.score(x) == result.score and vad.speech_segments(x) == result.segments
    # a clean one-second utterance: the mean window probability would drop it, the speech fraction keeps it
    hello = vad.analyze(speech["hello"])
    assert hello.mean_prob < 0.7 < hello.score
    # one utterance inside 10 s of silence is mostly not speech
    padded = np.concatenate([np.zeros(5 * SR, np.float32), speech["hello"], np.zeros(4 * SR, np.float32)])
    assert vad.score(padded) < 0.2 and len(vad.speech_segments(padded)) == 1
    noise = 0.1 * np.random.default_rng(1).standard_normal(2 * SR).astype(np.float32)
    assert vad.score(noise) < 0.1
    with pytest.raises(ValueError, match="mono"):
        vad.score(np.zeros((2, SR), np.float32))


def test_vad_model_errors_are_named(tmp_path):
    with pytest.raises(VadLoadError, match="nope.jit"):
        VoiceActivity(VadConfig(model=str(tmp_path / "nope.jit")))
    (tmp_path / "bad.jit").write_bytes(b"not a torchscript archive")
    with pytest.raises(VadLoadError, match="bad.jit"):
        VoiceActivity(VadConfig(model=str(tmp_path / "bad.jit")))


# --------------------------------------------------------------------------------------------- builder


def test_every_input_gets_a_status_and_speech_is_kept(corpus, built):
    rows = _statuses(built.out)
    assert {k: (r["status"], r["stage"]) for k, r in rows.items()} == EXPECTED
    n_files = sum(1 for p in corpus.iterdir() if p.suffix != ".txt" and p.name != "fox.json") + 1  # + orphan.txt
    assert built.n_inputs == len(EXPECTED) == n_files == sum(built.counts.values()) and built.n_shards == 4
    assert built.counts == {"kept": 4, "dropped": 7, "error": 3}
    for k in KEPT:
        assert rows[k]["vad_score"] > 0.7 and rows[k]["shard"].endswith(".tar")
    assert rows["noise"]["vad_score"] < 0.7 and rows["hum"]["vad_score"] < 0.7
    assert rows["noise"]["reason"].startswith("vad_score(")
    assert rows["silence"]["reason"] == "silent(rms -200.0<-60 dBFS)" and rows["silence"]["vad_score"] is None
    assert rows["short"]["reason"] == "too_short(0.25<0.5s)"
    assert rows["long"]["reason"] == "too_long(61.00>60s)" and rows["long"]["duration_s"] == 61.0
    assert rows["clipped"]["reason"].startswith("clipped(") and rows["clipped"]["clipped_fraction"] > 0.001
    assert rows["emptytext"]["reason"] == "empty_transcript"
    assert rows["corrupt"]["reason"].startswith(f"{corpus / 'corrupt.wav'}: not readable by libsndfile")
    assert rows["notext"]["reason"] == "missing transcript: no notext.txt or notext.json"
    assert rows["orphan_txt"]["reason"].startswith("orphan transcript file orphan.txt: no audio named orphan")
    assert rows["stereo44k"]["source_rate"] == 44_100 and rows["stereo44k"]["source_channels"] == 2
    for i in range(built.n_shards):
        stats = json.loads((built.out / f"shard_{i:05d}_stats.json").read_text())
        assert stats["ok"] + stats["dropped"] + stats["error"] == stats["inputs"]


def test_shards_hold_16k_mono_flac_transcripts_and_metadata(built, speech):
    import webdataset as wds

    members = _tar_members(built.out)
    assert set(members) == {f"{k}.{ext}" for k in KEPT for ext in ("flac", "txt", "json")}
    urls = [str(p) for p in sorted(built.out.glob("shard_*.tar"))]
    got = {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False)}
    assert set(got) == KEPT
    for key, s in got.items():
        samples, rate = sf.read(io.BytesIO(s["flac"]), dtype="float32")
        info = sf.info(io.BytesIO(s["flac"]))
        meta = json.loads(s["json"])
        assert rate == SR and samples.ndim == 1 and info.format == "FLAC" and info.subtype == "PCM_16"
        assert len(samples) / SR == pytest.approx(meta["duration_s"], abs=1e-3)
        assert s["txt"].decode() == meta["text"] and meta["status"] == "ok" and meta["vad_score"] > 0.7
        assert all(0 <= a < b <= meta["duration_s"] + 1e-3 for a, b in meta["speech_segments"])
    fox = json.loads(got["fox"]["json"])
    assert fox["meta"] == {"speaker": "espeak"} and got["fox"]["txt"].decode() == TEXTS["fox"]
    fox_audio = sf.read(io.BytesIO(got["fox"]["flac"]), dtype="float32")[0]
    assert np.abs(fox_audio - speech["fox"]).max() < 1e-4  # the 16 kHz audio, rounded to 16 bits
    stereo = json.loads(got["stereo44k"]["json"])
    assert (stereo["source_rate"], stereo["source_channels"]) == (44_100, 2)
    assert stereo["duration_s"] == pytest.approx(len(speech["weather"]) / SR, abs=2e-3)


def test_report_counts_every_input(built):
    report = json.loads((built.out / "report.json").read_text())
    assert report["inputs"] == len(EXPECTED) and sum(report["counts"].values()) == len(EXPECTED)
    # each step's time: the clips that reached it, and no more time than the stage holding it
    stages = report["engine"]["stages"]
    assert {"process", "write", "process:decode", "process:vad", "process:encode"} <= set(stages)
    assert stages["process:vad"]["items"] <= stages["process:decode"]["items"] <= len(EXPECTED)
    assert sum(v["seconds"] for k, v in stages.items() if k.startswith("process:")) <= stages["process"]["seconds"] + 0.01
    assert report["by_stage"] == {"dropped:clipping": 1, "dropped:duration": 2, "dropped:silence": 1,
                                  "dropped:text": 1, "dropped:vad": 2, "error:decode": 1, "error:read": 2}
    assert report["by_reason"]["vad:vad_score"] == 2 and report["by_reason"]["duration:too_long"] == 1
    assert report["by_reason"]["decode:not readable by libsndfile"] == 1
    kept = report["stats_kept"]
    assert kept["clips"] == 4 and kept["vad_score"]["min"] > 0.7
    assert kept["source_rate"] == {"16000": 3, "44100": 1} and kept["source_channels"] == {"1": 3, "2": 1}
    assert report["stats_decoded"]["clips"] == 10  # not: corrupt, the 2 read errors, the empty transcript
    for plot in ("duration", "vad_score"):
        assert (built.out / "report" / f"{plot}_hist.png").stat().st_size > 1000


def test_resume_after_an_interrupted_build_gives_the_same_shards(corpus, built, tmp_path):
    resumed = tmp_path / "resumed"
    partial = build_audio_shards(corpus, resumed, _config(tmp_path), progress=False, max_chunks=1)
    assert partial.n_inputs == -1 and len(list(resumed.glob("shard_*_stats.json"))) == 1  # "killed" after one
    (resumed / "shard_00001.tar.tmp").write_bytes(b"half-written")  # debris of the kill
    first = {f.name: f.stat().st_mtime_ns for f in resumed.glob("shard_00000*")}
    # resumed with 2 worker processes: the worker count is not part of the config a resume must match
    build_audio_shards(corpus, resumed, _config(tmp_path, workers=2), progress=False)
    assert first == {f.name: f.stat().st_mtime_ns for f in resumed.glob("shard_00000*")}  # done shard not redone
    assert _statuses(resumed) == _statuses(built.out) and _tar_members(resumed) == _tar_members(built.out)
    before = {f.name: f.stat().st_mtime_ns for f in resumed.iterdir() if f.is_file()}
    again = build_audio_shards(corpus, resumed, _config(tmp_path), progress=False)
    assert before == {f.name: f.stat().st_mtime_ns for f in resumed.iterdir() if f.is_file()}
    assert again.counts == built.counts
    with pytest.raises(ValueError, match="different config"):
        build_audio_shards(corpus, resumed, _config(tmp_path, vad={"threshold": 0.5}), progress=False)


def test_manifest_input(corpus, tmp_path):
    rows = [{"audio": "fox.wav", "text": TEXTS["fox"], "id": 0},
            {"audio": str(corpus / "noise.wav"), "text": "Noise."},
            {"audio": "missing.wav", "text": "Not there."}, {"text": "No audio field."}]
    (tmp_path / "fox.wav").write_bytes((corpus / "fox.wav").read_bytes())  # relative to the manifest
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    # row 2 names a file outside the manifest's folder: read only with allow_outside_root
    res = build_audio_shards(manifest, tmp_path / "out", _config(tmp_path, allow_outside_root=True), progress=False)
    got = [(r["status"], r["stage"]) for r in _statuses(res.out).values()]
    assert got == [("ok", None), ("dropped", "vad"), ("error", "read"), ("error", "read")]
    strict = build_audio_shards(manifest, tmp_path / "strict", _config(tmp_path), progress=False)
    assert "outside the dataset root" in _statuses(strict.out)["manifest_000000002"]["reason"]
    assert _statuses(res.out)["manifest_000000003"]["reason"] == (
        f"manifest.jsonl line 3: audio file not found: {tmp_path / 'missing.wav'}")
    assert json.loads(_tar_members(res.out)["manifest_000000001.json"])["meta"] == {"id": 0}


@pytest.mark.parametrize("text, key", [
    ("vad: {treshold: 0.5}", "treshold"), ("max_duraton_s: 3", "max_duraton_s"), ("[1, 2]", "expected a mapping"),
    ("vad: {threshold: 1.5}", "vad: threshold"), ("min_duration_s: 90", "min_duration_s")])
def test_config_errors_name_the_key(tmp_path, capsys, text, key):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError, match=key):
        load_audio_config(tmp_path / "bad.yaml")
    assert cli.main([str(tmp_path), str(tmp_path / "o"), "--config", str(tmp_path / "bad.yaml")]) == 2
    assert key in capsys.readouterr().err


def test_shipped_config_is_the_defaults_and_setup_errors_are_named(corpus, tmp_path, capsys):
    shipped = Path(__file__).parents[2] / "configs" / "audio_curation.yaml"
    assert load_audio_config(shipped) == AudioCurationConfig()
    assert not load_audio_config(None, {"vad": None}).vad.enabled
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"vad": {"model": str(tmp_path / "nope.jit")}}))
    with pytest.raises(StageSetupError, match="nope.jit"):
        build_audio_shards(corpus, tmp_path / "o", load_audio_config(tmp_path / "m.yaml"), progress=False)
    assert not list((tmp_path / "o").glob("shard_*")) and not (tmp_path / "o" / "config.json").exists()
    assert cli.main([str(tmp_path / "missing"), str(tmp_path / "o2")]) == 2
    assert "input not found" in capsys.readouterr().err
    with pytest.raises(CurationInputError, match="unknown input kind"):
        open_audio_input(corpus / "fox.wav")


def test_cli_prints_a_summary(corpus, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"samples_per_shard": 20}))
    assert cli.main([str(corpus), str(tmp_path / "o"), "--config", str(tmp_path / "c.yaml"), "--workers", "1"]) == 0
    captured = capsys.readouterr()
    assert f"{len(EXPECTED)} inputs -> 4 kept" in captured.err
    assert "7 dropped, 3 errors in 1 shards" in captured.err and "vad:vad_score: 2" in captured.err
    assert json.loads(captured.out)["counts"] == {"kept": 4, "dropped": 7, "error": 3}
