"""Each synthetic task, written by make_synthetic, curated by its shard builder's CLI with the checked-in
synthetic config: every input accounted for, and kept samples carry question / answer / kind into key.json."""

import json
import shutil
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import torch
import yaml

from data_curation.sscd import build_sscd
from scripts import build_audio_shards, build_shards, build_video_shards, make_synthetic
from tests.system_deps import require_binary

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _make(task: str, out: Path, n_train: int) -> Path:
    assert make_synthetic.main([task, str(out), "--n-train", str(n_train), "--n-test", "1", "--seed", "0",
                                "--json"]) == 0
    return out / "train"


def _build(cli, train: Path, out: Path, config: Path, capsys) -> dict:
    capsys.readouterr()
    assert cli.main([str(train), str(out), "--config", str(config), "--workers", "1", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _statuses(out: Path) -> dict[str, str]:
    rows = [r for f in sorted(out.glob("shard_*.parquet")) for r in pq.read_table(f).to_pylist()]
    return {r["key"]: r["status"] for r in rows}


def _shard_jsons(out: Path) -> dict[str, dict]:
    found = {}
    for f in sorted(out.glob("shard_*.tar")):
        with tarfile.open(f) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    found[m.name[: -len(".json")]] = json.loads(tar.extractfile(m).read())
    return found


def _check_accounting(report: dict, out: Path, train: Path, n_inputs: int) -> dict[str, dict]:
    """Counts add up, every input has one status row, and each kept sample's key.json holds its sidecar's
    question, answer and kind. Returns the kept samples' key.json by key."""
    counts = report["counts"]
    assert report["inputs"] == n_inputs == counts["kept"] + counts["dropped"] + counts["error"]
    statuses = _statuses(out)
    assert len(statuses) == n_inputs
    kept = _shard_jsons(out)
    assert sorted(kept) == sorted(k for k, s in statuses.items() if s == "ok") and len(kept) == counts["kept"]
    for key, record in kept.items():
        sidecar = json.loads((train / f"{key}.json").read_text())
        want = {k: sidecar[k] for k in ("question", "answer", "kind") if k in sidecar}
        assert {k: record["meta"][k] for k in want} == want
    return kept


def test_image_vqa_is_curated_with_dedup_on(tmp_path, capsys):
    train = _make("image-vqa", tmp_path / "data", 6)
    # a planted exact copy: dedup must drop it and only it
    shutil.copy(train / "00000.png", train / "copy.png")
    shutil.copy(train / "00000.json", train / "copy.json")
    cfg = yaml.safe_load((CONFIGS / "curation_synthetic.yaml").read_text())
    torch.manual_seed(0)
    torch.save(build_sscd("tiny").state_dict(), tmp_path / "sscd.pt")
    # Random tiny SSCD weights squeeze every similarity towards 1 (distinct scenes: 0.97-0.9991); an exact
    # copy is 1.0. The checked-in threshold is for the real sscd_disc_mixup weights.
    cfg["dedup"].update(sscd=str(tmp_path / "sscd.pt"), threshold=0.9995, clusters=2)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    report = _build(build_shards, train, tmp_path / "shards", tmp_path / "cfg.yaml", capsys)
    kept = _check_accounting(report, tmp_path / "shards", train, 7)
    assert report["counts"] == {"kept": 6, "dropped": 1, "error": 0}
    assert report["by_stage"] == {"dropped:dedup": 1}
    assert {r["meta"]["kind"] for r in kept.values()} == {"colour", "shape", "side", "count"}


def test_video_motion_is_curated_and_a_broken_clip_is_an_error(tmp_path, capsys):
    train = _make("video-motion", tmp_path / "data", 4)
    (train / "broken.mp4").write_bytes((train / "00000.mp4").read_bytes()[:200])
    shutil.copy(train / "00000.json", train / "broken.json")
    report = _build(build_video_shards, train, tmp_path / "shards", CONFIGS / "video_curation_synthetic.yaml",
                    capsys)
    kept = _check_accounting(report, tmp_path / "shards", train, 5)
    assert report["counts"] == {"kept": 4, "dropped": 0, "error": 1}
    assert all(r["meta"]["question"] == "Which way does the ball move?" for r in kept.values())


def test_spoken_digits_are_curated_and_silence_is_dropped(tmp_path, capsys):
    require_binary("espeak-ng")
    train = _make("spoken-digits", tmp_path / "data", 4)
    silent = train / "silent.wav"
    shutil.copy(train / "00000.wav", silent)
    import soundfile as sf

    x, rate = sf.read(silent)
    sf.write(silent, x * 0, rate)
    shutil.copy(train / "00000.json", train / "silent.json")
    report = _build(build_audio_shards, train, tmp_path / "shards", CONFIGS / "audio_curation_synthetic.yaml",
                    capsys)
    kept = _check_accounting(report, tmp_path / "shards", train, 5)
    assert report["counts"] == {"kept": 4, "dropped": 1, "error": 0}
    assert all(r["meta"]["kind"] == "transcript" and r["text"] == r["meta"]["answer"] for r in kept.values())
