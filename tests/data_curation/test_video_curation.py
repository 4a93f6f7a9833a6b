"""Video curation on synthetic videos: caption cleaning, motion score, OCR overlay and CLIP scores, then the
shard builder end to end (statuses, original bytes in the tars, report, resume, named errors)."""

import io
import json
import subprocess
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image, ImageDraw, ImageFont

from data_curation.curation_config import ConfigError
from data_curation.filters import ClipScorer
from data_curation.ocr import OCRResult, TesseractOCR
from data_curation.shards import StageSetupError
from data_curation.video_filters import (VideoCaptionRules, clean_caption, clip_video_scores, frame_positions,
                                         motion_num_frames, motion_score, sample_for_motion, text_area_fraction,
                                         text_overlay, video_caption_reason)
from data_curation.video_shards import (VideoCurationConfig, build_video_shards, container_ext, load_video_config,
                                        open_video_input)
from media.video import VideoReader
from scripts import build_video_shards as cli
from tests.system_deps import require_binary
from vision.clip import build_clip, open_clip_model_cfg
from vision.encoder import vision_config

FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")
DEFAULT_MIN_MOTION = VideoCurationConfig().motion.min_score

# ------------------------------------------------------------------------------------ synthetic videos


def texture(w: int, h: int, shift: float = 0.0, seed: int = 0) -> np.ndarray:
    """(h, w, 3) uint8 smooth pattern defined in frame-relative coordinates, shifted right by ``shift``
    frame widths: the same picture (and the same relative motion) at any resolution."""
    rng = np.random.default_rng(seed)
    u, v = np.meshgrid((np.arange(w) + 0.5) / w, (np.arange(h) + 0.5) / h)
    img = np.zeros((h, w))
    for _ in range(6):
        fx, fy = rng.uniform(1, 4, 2)
        img += np.sin(2 * np.pi * (fx * (u - shift) + fy * v) + rng.uniform(0, 2 * np.pi))
    img = (img - img.min()) / np.ptp(img) * 255
    return np.stack([img, 0.8 * img + 20, 255 - img], -1).astype(np.uint8)


def pan(w: int, h: int, n: int = 20, speed: float = 0.01) -> list[np.ndarray]:
    return [texture(w, h, speed * t) for t in range(n)]


def moving_square(w: int, h: int, n: int = 20, step: int = 3) -> list[np.ndarray]:
    frames = []
    for t in range(n):
        f = np.full((h, w, 3), 30, np.uint8)
        x = (5 + step * t) % (w - 20)
        f[h // 3:h // 3 + 20, x:x + 20] = (250, 200, 40)
        frames.append(f)
    return frames


def text_frame(w: int = 160, h: int = 120) -> np.ndarray:
    img = Image.new("RGB", (w, h), "white")
    font = ImageFont.truetype(str(FONT), 26) if FONT.exists() else ImageFont.load_default(size=26)
    draw = ImageDraw.Draw(img)
    draw.text((6, 18), "BIG SALE", font=font, fill="black")
    draw.text((6, 64), "TODAY", font=font, fill="black")
    return np.asarray(img)


def write_video(path: Path, frames: list[np.ndarray], fps: float = 10) -> bytes:
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    assert writer.isOpened(), "OpenCV cannot write mp4v"
    for f in frames:
        writer.write(np.ascontiguousarray(f[:, :, ::-1]))
    writer.release()
    return path.read_bytes()


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("clips")
    out = {
        "pan": write_video(d / "pan.mp4", pan(128, 96)),
        "square": write_video(d / "square.mp4", moving_square(96, 64)),
        "static": write_video(d / "static.mp4", [texture(128, 96)] * 20),
        "text": write_video(d / "text.mp4", [text_frame()] * 10),
    }
    subprocess.run([require_binary("ffmpeg"), "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i",
                    "sine=frequency=440:duration=1",
                    "-c:a", "aac", "-f", "mp4", "-y", str(d / "audio.mp4")], check=True)
    out["audio"] = (d / "audio.mp4").read_bytes()
    return out


def frames_of(data: bytes, k: int) -> np.ndarray:
    return VideoReader(timeout_s=None).sample(data, k, name="clip.mp4").frames


# ---------------------------------------------------------------------------------------------- caption


@pytest.mark.parametrize("raw, cleaned", [
    ("a dog runs on the beach.  it jumps!", "A dog runs on the beach. It jumps!"),
    ("A DOG RUNS ON THE BEACH", "A dog runs on the beach"),
    ("i think i can see it", "I think I can see it"),
    ("dog chasing a ball near the NASA logo", "Dog chasing a ball near the NASA logo"),
    ("iPhone video of a cat", "iPhone video of a cat"),
    ("  Two people\ttalking\n", "Two people talking"),
])
def test_clean_caption(raw, cleaned):
    assert clean_caption(raw) == cleaned
    assert clean_caption(raw, fix_case=False) == " ".join(raw.split())


def test_video_caption_rules():
    assert video_caption_reason("a dog") == ("A dog", "too_short(5<10)")
    assert video_caption_reason("beautiful   dogs") == ("Beautiful dogs", "too_few_words(2<3)")
    assert video_caption_reason("A DOG IS RUNNING FAST") == ("A dog is running fast", None)
    assert video_caption_reason("see www.example.com/x now")[1] == "url"
    assert video_caption_reason("a dog", VideoCaptionRules(min_words=2, min_chars=3)) == ("A dog", None)


# ----------------------------------------------------------------------------------------------- motion


def test_motion_static_is_zero_and_moving_is_clearly_above_the_threshold(clips):
    static = motion_score(frames_of(clips["static"], 4))
    assert static < DEFAULT_MIN_MOTION / 20
    for name in ("pan", "square"):
        assert motion_score(frames_of(clips[name], 4)) > 3 * DEFAULT_MIN_MOTION, name
    assert motion_score(frames_of(clips["pan"], 4)[:1]) == 0.0


def test_motion_score_does_not_depend_on_resolution(tmp_path):
    # the same relative motion (1% of the width per frame, 4.75% per sampled pair) at 64x48, 128x96, 256x192
    frames = {w: frames_of(write_video(tmp_path / f"{w}.mp4", pan(w, w * 3 // 4)), 5) for w in (64, 128, 256)}
    scores = [motion_score(f) for f in frames.values()]
    assert max(scores) / min(scores) < 1.05, scores
    assert scores[0] == pytest.approx(0.0475 * 4 / 5, rel=0.1)  # the true displacement / diagonal (4:3 frame)
    # measured on 32 px instead of 64 px frames the flow halves in pixels; divided by the diagonal it does not
    by_side = [motion_score(frames[256], side) for side in (32, 64)]
    assert max(by_side) / min(by_side) < 1.1, by_side


def test_sample_for_motion_samples_at_2_fps(clips):
    assert [motion_num_frames(d) for d in (0.1, 2.0, 10.2, 600)] == [2, 4, 20, 64]
    reader = VideoReader(timeout_s=None)
    got = sample_for_motion(reader, clips["pan"], "pan.mp4")  # 20 frames at 10 fps = 2 s
    assert got.frames.shape == (4, 96, 128, 3) and got.frame_mask.all()
    assert sample_for_motion(reader, clips["pan"], "pan.mp4", fps=1.0).frames.shape[0] == 2


# -------------------------------------------------------------------------------------------------- OCR


def test_text_area_fraction_counts_overlapping_boxes_once():
    words = [{"text": "a", "conf": 90.0, "box": (0, 0, 10, 10)}, {"text": "b", "conf": 90.0, "box": (5, 0, 10, 10)}]
    assert text_area_fraction(OCRResult("a b", words), 20, 10) == pytest.approx(15 * 10 / 200)
    assert text_area_fraction(OCRResult(""), 20, 10) == 0.0


def test_text_overlay_on_rendered_text_and_on_a_plain_video(clips):
    ocr = TesseractOCR()
    frames = frames_of(clips["text"], 9)[frame_positions(9, (0.25, 0.5, 0.75))]
    overlay = text_overlay(ocr, frames)
    assert "SALE" in overlay.text.upper() and len(overlay.per_frame) == 3
    assert overlay.score > VideoCurationConfig().ocr.max_area
    plain = text_overlay(ocr, frames_of(clips["square"], 1), reduce="max")
    assert plain.score == 0.0 and plain.text == ""


class FakeOCR:
    """Text covering the top half of the first frame only."""

    def __init__(self):
        self.calls = 0

    def read(self, img):
        self.calls += 1
        words = [{"text": "HI", "conf": 95.0, "box": (0, 0, img.width, img.height // 2)}] if self.calls == 1 else []
        return OCRResult("HI" if words else "", words)


def test_text_overlay_reduces_by_mean_or_max():
    frames = np.zeros((2, 10, 20, 3), np.uint8)
    assert text_overlay(FakeOCR(), frames).per_frame == [0.5, 0.0]
    assert text_overlay(FakeOCR(), frames).score == 0.25 and text_overlay(FakeOCR(), frames, "max").score == 0.5
    with pytest.raises(ValueError, match="median"):
        text_overlay(FakeOCR(), frames, "median")


# ------------------------------------------------------------------------------------------------- CLIP


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    """A random tiny open_clip model saved in open_clip's ``local-dir:`` layout (as test_shards.py does)."""
    d = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip_model_cfg(vision_config("tiny"))}))
    torch.save(build_clip(vision_config("tiny")).state_dict(), d / "open_clip_pytorch_model.bin")
    return d


def test_clip_video_scores_match_clip_scorer(clips, clip_dir):
    # a random model cannot check alignment: this checks the plumbing against ClipScorer and open_clip
    scorer = ClipScorer.load(f"local-dir:{clip_dir}", None)
    frames = frames_of(clips["pan"], 9)
    caption = "A striped pattern sliding sideways"
    frame_score, video_score = clip_video_scores(scorer, frames, caption, frame_index=4)
    expected = scorer.score([Image.fromarray(frames[4])], [caption])[0]
    assert frame_score == pytest.approx(float(expected), abs=1e-5)
    with torch.no_grad():
        img = torch.nn.functional.normalize(scorer.model.encode_image(
            torch.stack([scorer.preprocess(Image.fromarray(f)) for f in frames])), dim=-1)
        txt = torch.nn.functional.normalize(scorer.model.encode_text(scorer.tokenizer([caption])), dim=-1)[0]
    mean = torch.nn.functional.normalize(img.mean(0), dim=0)
    assert video_score == pytest.approx(float(mean @ txt), abs=1e-5)
    assert clip_video_scores(scorer, frames, caption, 4, batch_size=2) == pytest.approx((frame_score, video_score),
                                                                                       abs=1e-5)
    assert -1 <= video_score <= 1
    assert clip_video_scores(scorer, frames, caption, frame_index=4) == (frame_score, video_score)  # deterministic


# ------------------------------------------------------------------------------------------- the builder

CAPTIONS = {
    "pan": "a colourful striped pattern sliding to the right",  # lower case: fixed to sentence case
    "square": "A yellow square moving across a dark background",
    "static": "A still picture of a colourful striped pattern",
    "text": "An advertisement with big black letters on white",
    "german": "Ein bunter Streifen bewegt sich langsam nach rechts",
    "short": "a pan",
    "corrupt": "A video file that is only random bytes",
    "empty": "A video file that has no bytes at all",
    "audio": "A sine tone with no picture at all here",
}
KEPT = {"pan", "square"}
EXPECTED = {  # key -> (status, stage)
    "static": ("dropped", "motion"), "text": ("dropped", "ocr"), "german": ("dropped", "language"),
    "short": ("dropped", "caption"), "corrupt": ("error", "decode"), "empty": ("error", "decode"),
    "audio": ("error", "decode"), "nocaption": ("error", "read"), "orphan_txt": ("error", "read"),
    **{k: ("ok", None) for k in KEPT},
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, clips) -> Path:
    root = tmp_path_factory.mktemp("videos")
    data = {"pan": clips["pan"], "square": clips["square"], "static": clips["static"],
            "text": clips["text"], "german": clips["pan"], "short": clips["pan"],
            "corrupt": np.random.default_rng(0).bytes(4000), "empty": b"", "audio": clips["audio"]}
    for key, video in data.items():
        (root / f"{key}.mp4").write_bytes(video)
        (root / f"{key}.txt").write_text(CAPTIONS[key])
    (root / "square.json").write_text(json.dumps({"url": "https://example.com/square"}))  # meta beside the .txt
    (root / "nocaption.mp4").write_bytes(clips["pan"])
    (root / "orphan.txt").write_text("A caption without its video file")
    return root


def _config(tmp_path: Path, clip_dir: Path, name: str = "video.yaml", **over) -> VideoCurationConfig:
    cfg = {"samples_per_shard": 4, "workers": 1,
           "clip": {"model": f"local-dir:{clip_dir}", "pretrained": None, "frame_threshold": -1.0,
                    "video_threshold": -1.0},
           **over}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return load_video_config(path)


def _statuses(out: Path) -> dict[str, dict]:
    rows = [r for f in sorted(out.glob("shard_*.parquet")) for r in pq.read_table(f).to_pylist()]
    return {r["key"]: r for r in rows}


def _members(out: Path) -> dict[str, bytes]:
    members = {}
    for f in sorted(out.glob("shard_*.tar")):
        with tarfile.open(f) as tar:
            for m in tar.getmembers():
                members[m.name] = tar.extractfile(m).read()
    return members


@pytest.fixture(scope="module")
def built(tmp_path_factory, corpus, clip_dir):
    out = tmp_path_factory.mktemp("built") / "out"
    cfg = _config(tmp_path_factory.mktemp("cfg"), clip_dir)
    return build_video_shards(corpus, out, cfg, progress=False), cfg


def test_every_input_gets_a_status_and_kept_videos_are_copied_byte_for_byte(corpus, built):
    res, _ = built
    rows = _statuses(res.out)
    assert {k: (r["status"], r["stage"]) for k, r in rows.items()} == EXPECTED
    assert res.n_inputs == len(EXPECTED) == sum(res.counts.values()) and res.n_shards == 3
    assert res.counts == {"kept": 2, "dropped": 4, "error": 5}
    assert rows["german"]["reason"] == "language(de)"
    assert rows["short"]["reason"] == "too_short(5<10)"
    assert rows["static"]["reason"].startswith("low_motion(")
    assert rows["text"]["reason"].startswith("text_area(")
    assert "empty" in rows["empty"]["reason"] and "no video stream" in rows["audio"]["reason"]
    assert rows["orphan_txt"]["reason"].startswith("orphan caption file orphan.txt: no video named orphan")
    assert rows["static"]["motion_score"] < DEFAULT_MIN_MOTION < rows["pan"]["motion_score"]
    for i in range(res.n_shards):
        stats = json.loads((res.out / f"shard_{i:05d}_stats.json").read_text())
        assert stats["ok"] + stats["dropped"] + stats["error"] == stats["inputs"]

    members = _members(res.out)
    assert set(members) == {f"{k}.{ext}" for k in KEPT for ext in ("mp4", "txt", "json")}
    for k in KEPT:
        assert members[f"{k}.mp4"] == (corpus / f"{k}.mp4").read_bytes()  # the original bytes
    assert members["pan.txt"].decode() == "A colourful striped pattern sliding to the right"
    meta = json.loads(members["pan.json"])
    assert meta["status"] == "ok" and meta["caption_raw"] == CAPTIONS["pan"] and meta["lang"] == "en"
    assert [meta[k] for k in ("width", "height", "fps", "duration_s", "motion_frames")] == [128, 96, 10, 2, 4]
    assert meta["ocr_area"] == 0.0 and -1 <= meta["clip_frame_score"] <= 1 and -1 <= meta["clip_video_score"] <= 1
    assert meta["motion_score"] > DEFAULT_MIN_MOTION
    assert json.loads(members["square.json"])["meta"] == {"url": "https://example.com/square"}


def test_report_has_counts_statistics_and_plots(built):
    res, _ = built
    report = json.loads((res.out / "report.json").read_text())
    assert report["inputs"] == len(EXPECTED) and sum(report["counts"].values()) == len(EXPECTED)
    stages = report["engine"]["stages"]
    assert {"process:caption", "process:decode"} <= set(stages) and len(report["engine"]["chunks_by_node"]) == 1
    assert stages["process:decode"]["items"] <= stages["process:caption"]["items"] <= len(EXPECTED)
    assert report["by_stage"]["dropped:motion"] == 1 and report["by_stage"]["error:decode"] == 3
    assert report["by_reason"]["decode:no video stream"] == 1 and report["by_reason"]["motion:low_motion"] == 1
    kept = report["stats_kept"]
    assert kept["videos"] == 2 and kept["duration_s"]["median"] == 2.0
    assert kept["duration_s"]["share_under_60s"] == 1
    assert kept["short_side"]["min"] == 64 and kept["aspect_ratio"]["max"] == 1.5
    assert report["stats_decoded"]["videos"] == 4  # + static and text; german/short never got decoded
    for plot in ("duration", "resolution", "aspect_ratio", "motion_score"):
        assert (res.out / "report" / f"{plot}_hist.png").stat().st_size > 1000


def test_resume_after_an_interrupted_build_gives_the_same_shards(corpus, built, clip_dir, tmp_path):
    # OCR and CLIP off: the 2 spawned workers then skip open_clip's import (seconds on 2 cores)
    cheap = {"ocr": None, "clip": None}
    clean = build_video_shards(corpus, tmp_path / "clean", _config(tmp_path, clip_dir, **cheap), progress=False)
    resumed = tmp_path / "resumed"
    cfg = _config(tmp_path, clip_dir, **cheap)
    partial = build_video_shards(corpus, resumed, cfg, progress=False, max_chunks=1)
    assert partial.n_inputs == -1 and len(list(resumed.glob("shard_*_stats.json"))) == 1  # "killed" after one shard
    (resumed / "shard_00001.tar.tmp").write_bytes(b"half-written")  # debris of the kill
    # resumed with 2 worker processes: the worker count is not part of the config a resume must match
    cfg2 = _config(tmp_path, clip_dir, workers=2, **cheap)
    build_video_shards(corpus, resumed, cfg2, progress=False)
    assert _statuses(resumed) == _statuses(clean.out)
    assert _members(resumed) == _members(clean.out)
    assert {k: r["status"] for k, r in _statuses(resumed).items()} == {k: v[0] for k, v in EXPECTED.items()}
    before = {f.name: f.stat().st_mtime_ns for f in resumed.iterdir() if f.is_file()}
    again = build_video_shards(corpus, resumed, cfg2, progress=False)  # a third run finds every _stats.json
    assert before == {f.name: f.stat().st_mtime_ns for f in resumed.iterdir() if f.is_file()}
    assert again.counts == clean.counts
    with pytest.raises(ValueError, match="different config"):
        build_video_shards(corpus, resumed, _config(tmp_path, clip_dir, samples_per_shard=5, **cheap),
                           progress=False)


def test_manifest_input(corpus, clip_dir, tmp_path):
    rows = [{"video": f"{k}.mp4", "caption": CAPTIONS[k], "id": i}
            for i, k in enumerate(("pan", "static", "audio"))]
    rows.append({"video": "missing.mp4", "caption": "A video that is not there at all"})
    manifest = tmp_path / "manifest.jsonl"  # paths relative to the manifest's folder, or absolute
    manifest.write_text("\n".join(json.dumps({**r, "video": str(corpus / r["video"])}) for r in rows))
    # absolute paths outside the manifest's folder: read only with allow_outside_root
    assert [s.status for s in open_video_input(manifest)] == ["error"] * 4
    samples = list(open_video_input(manifest, allow_outside_root=True))
    assert [s.status for s in samples] == ["ok", "ok", "ok", "error"]
    assert samples[0].image_bytes == (corpus / "pan.mp4").read_bytes() and samples[0].meta == {"id": 0}
    res = build_video_shards(manifest, tmp_path / "out",
                             _config(tmp_path, clip_dir, ocr=None, clip=None, allow_outside_root=True), progress=False)
    rows = _statuses(res.out)
    assert [(r["status"], r["stage"]) for r in rows.values()] == [
        ("ok", None), ("dropped", "motion"), ("error", "decode"), ("error", "read")]
    # manifest rows have no file suffix: the reader is given the sniffed container's
    assert rows["manifest_000000003"]["reason"].startswith(f"{manifest}:3#.mp4: ")
    assert json.loads(_members(res.out)["manifest_000000001.json"])["meta"] == {"id": 0}


def test_webdataset_input(corpus, built, tmp_path):
    # the builder's own output read back (video2dataset's layout: key.mp4 + key.txt + key.json)
    res, _ = built
    wds = list(open_video_input(str(res.out / "shard_*.tar")))
    assert sorted(s.key for s in wds) == sorted(KEPT) and all(s.ok for s in wds)
    pan = next(s for s in wds if s.key == "pan")
    assert pan.image_bytes == (corpus / "pan.mp4").read_bytes() and pan.source.endswith("shard_00001.tar:pan.mp4")
    assert pan.caption == "A colourful striped pattern sliding to the right" and pan.meta["status"] == "ok"
    # a group without a video, and a truncated shard, are error samples naming them
    tar_path = tmp_path / "in.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name, data in (("a.webm", b"\x1a\x45\xdf\xa3 webm"), ("a.txt", b"A caption for the first one"),
                           ("b.txt", b"A caption with no video beside it")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    got = {s.key: s for s in open_video_input(tar_path)}
    assert got["a"].ok and got["a"].caption == "A caption for the first one"
    assert container_ext(got["a"].image_bytes) == "webm"
    assert got["b"].status == "error" and "has no video member" in got["b"].reason
    (tmp_path / "cut.tar").write_bytes(tar_path.read_bytes()[:1100])
    cut = list(open_video_input(tmp_path / "cut.tar"))
    assert cut[-1].status == "error" and "truncated" in cut[-1].reason


def test_config_errors_name_the_key(tmp_path, clip_dir, capsys):
    assert load_video_config(Path(__file__).parents[2] / "configs" / "video_curation.yaml") == VideoCurationConfig()
    cases = {"motion: {min_scroe: 0.1}\n": "min_scroe", "sampels_per_shard: 3\n": "sampels_per_shard",
             "ocr: {reduce: median}\n": "ocr.reduce", "decode: {frames: 100}\n": "decode.frames"}
    for text, key in cases.items():
        (tmp_path / "bad.yaml").write_text(text)
        with pytest.raises(ConfigError, match=key):
            load_video_config(tmp_path / "bad.yaml")
    off = load_video_config(None, {"ocr": None, "clip": {"enabled": False}, "motion": None})
    assert not (off.ocr.enabled or off.clip.enabled or off.motion.enabled) and off.language.enabled
    assert cli.main([str(tmp_path), str(tmp_path / "o"), "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "decode.frames" in capsys.readouterr().err


def test_a_bad_clip_model_is_one_named_stage_error(corpus, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"clip": {"model": f"local-dir:{tmp_path / 'nope'}",
                                                              "pretrained": None}, "workers": 2}))
    cfg = load_video_config(tmp_path / "c.yaml")
    with pytest.raises(StageSetupError, match="cannot set up the video curation stages"):
        build_video_shards(corpus, tmp_path / "o", cfg, progress=False)
    assert not list((tmp_path / "o").glob("shard_*"))
    assert cli.main([str(corpus), str(tmp_path / "o2"), "--config", str(tmp_path / "c.yaml")]) == 2
    assert "nope" in capsys.readouterr().err
    ocr = {"ocr": {"lang": "klingon"}, "clip": None}
    (tmp_path / "d.yaml").write_text(yaml.safe_dump(ocr))
    assert cli.main([str(corpus), str(tmp_path / "o3"), "--config", str(tmp_path / "d.yaml")]) == 2
    assert "klingon" in capsys.readouterr().err


def test_cli_prints_a_summary(corpus, clip_dir, tmp_path, capsys):
    cfg = {"samples_per_shard": 20, "workers": 2, "ocr": None, "motion": None, "clip": None}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert cli.main([str(corpus), str(tmp_path / "o"), "--config", str(tmp_path / "c.yaml"), "--workers", "1"]) == 0
    captured = capsys.readouterr()
    assert f"{len(EXPECTED)} inputs -> 4 kept, 2 dropped, 5 errors in 1 shards" in captured.err
    assert json.loads(captured.out)["counts"] == {"kept": 4, "dropped": 2, "error": 5}
