"""The shard builder end to end on real photos and real bad inputs: statuses, shards, report, resume."""

import io
import json
import tarfile

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont
from skimage import data as skdata

from data_curation.curation_config import ConfigError, load_config
from data_curation.safety import PHashBlocklist
from data_curation.sscd import build_sscd
from data_curation.shards import build_shards
from scripts import build_shards as build_shards_cli
from vision.clip import build_clip, open_clip_model_cfg
from vision.encoder import vision_config

PHOTOS = {
    "astronaut": (skdata.astronaut, "An astronaut in a white space suit with a flag"),
    "coffee": (skdata.coffee, "A cup of coffee on a saucer with a spoon"),
    "chelsea": (skdata.chelsea, "A tabby cat looking to the side"),
    "rocket": (skdata.rocket, "A rocket on the launch pad under a blue sky"),
    "coins": (skdata.coins, "Old coins on a dark background photo"),
    "hubble": (skdata.hubble_deep_field, "A deep field photo of distant galaxies"),
}


def _jpeg(img: Image.Image, quality=90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of 14 inputs: 6 photos, 2 planted near-duplicates, text for OCR, and 5 bad inputs."""
    root = tmp_path_factory.mktemp("corpus")
    imgs = {}
    for name, (load, caption) in PHOTOS.items():
        imgs[name] = Image.fromarray(load()).convert("RGB")
        (root / f"{name}.jpg").write_bytes(_jpeg(imgs[name]))
        (root / f"{name}.txt").write_text(caption)
    w, h = imgs["coffee"].size
    crop = imgs["coffee"].crop((5, 5, w - 5, h - 5)).resize((w, h))
    (root / "coffee_copy.jpg").write_bytes(_jpeg(crop, quality=40))  # crop + recompression
    (root / "coffee_copy.txt").write_text("A cup of coffee, a much longer caption on a white saucer with a spoon")
    (root / "rocket_copy.jpg").write_bytes(_jpeg(imgs["rocket"], quality=50))
    (root / "rocket_copy.txt").write_text("Rocket photo")
    sign = Image.new("RGB", (560, 200), "white")
    font = ImageFont.load_default(size=64)
    ImageDraw.Draw(sign).text((30, 60), "STOP HERE", fill="black", font=font)
    (root / "sign.png").write_bytes(_png(sign))
    (root / "sign.txt").write_text("A white sign with black words on it")
    # bad inputs
    (root / "broken.jpg").write_bytes(_jpeg(imgs["chelsea"])[:300])  # truncated
    (root / "broken.txt").write_text("A truncated photo of a cat")
    (root / "nocaption.jpg").write_bytes(_jpeg(imgs["coins"]))
    (root / "badtext.jpg").write_bytes(_jpeg(imgs["hubble"]))
    (root / "badtext.txt").write_bytes(b"\xff\xfe not utf-8 \xff")
    (root / "german.jpg").write_bytes(_jpeg(imgs["astronaut"].rotate(90)))
    (root / "german.txt").write_text("Ein Astronaut im weissen Raumanzug steht neben der Flagge")
    (root / "short.jpg").write_bytes(_jpeg(imgs["coins"].rotate(90)))
    (root / "short.txt").write_text("img")
    (root / "orphan.txt").write_text("a caption without an image")
    return root, imgs


def _png(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


N_INPUTS = 6 + 2 + 1 + 6  # photos, copies, sign, 6 bad (broken, nocaption, badtext, german, short, orphan)


@pytest.fixture(scope="module")
def models(tmp_path_factory, corpus):
    d = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    vision = vision_config("tiny")
    clip = build_clip(vision)
    (d / "clip").mkdir()
    (d / "clip" / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip_model_cfg(vision)}))
    torch.save(clip.state_dict(), d / "clip" / "open_clip_pytorch_model.bin")
    torch.save(build_sscd("tiny").state_dict(), d / "sscd.pt")
    blocklist = PHashBlocklist.from_hashes([])
    blocklist.add(corpus[1]["chelsea"])
    blocklist.save(d / "blocklist.txt")
    (d / "vocab.txt").write_text("photo\ncoffee\ncat\nrocket\n")
    return d


def _config(models, tmp_path, **over):
    # Random SSCD weights squeeze every similarity towards 1 (unrelated photos here: 0.96-0.992, the planted
    # copies: >= 0.9996), so this test separates them at 0.998; the trained model's usual threshold is 0.75.
    cfg = {
        "samples_per_shard": 4, "workers": 1,
        "clip": {"model": f"local-dir:{models / 'clip'}", "pretrained": None, "threshold": -1.0},
        "dedup": {"sscd": str(models / "sscd.pt"), "threshold": 0.998, "keep": "longest_caption", "clusters": 2},
        "safety": {"blocklist": str(models / "blocklist.txt")},
        "resample": {"vocab": str(models / "vocab.txt"), "t": 100, "keep_unmatched": True},
        **over,
    }
    path = tmp_path / "curation.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return load_config(path)


def _statuses(out):
    rows = []
    for f in sorted(out.glob("shard_*.parquet")):
        rows += pq.read_table(f).to_pylist()
    return {r["key"]: r for r in rows}


def _tar_members(out):
    members = {}
    for f in sorted(out.glob("shard_*.tar")):
        with tarfile.open(f) as tar:
            for m in tar.getmembers():
                members[m.name] = tar.extractfile(m).read()
    return members


def test_every_input_gets_a_status_and_kept_pairs_land_in_shards(corpus, models, tmp_path):
    root, imgs = corpus
    out = tmp_path / "out"
    res = build_shards(root, out, _config(models, tmp_path), progress=False)
    rows = _statuses(out)
    assert len(rows) == N_INPUTS == res.n_inputs
    assert sum(res.counts.values()) == N_INPUTS
    reasons = {k: (r["status"], r["stage"]) for k, r in rows.items()}
    assert reasons["broken"] == ("error", "decode")
    assert reasons["nocaption"][0] == "error" and "caption" in rows["nocaption"]["reason"]
    assert reasons["badtext"][0] == "error"
    assert reasons["orphan_txt"][0] == "error"
    assert reasons["german"] == ("dropped", "language")
    assert reasons["short"] == ("dropped", "caption")
    assert reasons["chelsea"] == ("dropped", "safety") and "phash" in rows["chelsea"]["reason"]
    # planted near-duplicates: exactly one of each pair survives, the longer caption (keep: longest_caption)
    assert reasons["coffee_copy"][0] == "ok" and reasons["coffee"] == ("dropped", "dedup")
    assert rows["coffee"]["reason"] == "duplicate_of(coffee_copy)"
    assert reasons["rocket"][0] == "ok" and reasons["rocket_copy"] == ("dropped", "dedup")

    members = _tar_members(out)
    kept = {k for k, r in rows.items() if r["status"] == "ok"}
    assert {m.split(".")[0] for m in members} == kept
    for k in kept:
        assert {f"{k}.jpg", f"{k}.txt", f"{k}.json"} <= set(members)
        Image.open(io.BytesIO(members[f"{k}.jpg"])).verify()
    meta = json.loads(members["sign.json"])
    assert "STOP" in meta["ocr_text"].upper() and "clip_score" in meta and meta["dedup_component"] == "sign"
    astronaut = json.loads(members["astronaut.json"])
    assert astronaut["faces_blurred"] >= 1  # the face is blurred: the stored JPEG is not the input file
    assert members["astronaut.jpg"] != (root / "astronaut.jpg").read_bytes()
    assert members["hubble.jpg"] == (root / "hubble.jpg").read_bytes()  # untouched JPEGs are copied as is

    report = json.loads((out / "report.json").read_text())
    assert report["inputs"] == N_INPUTS and sum(report["counts"].values()) == N_INPUTS
    for plot in ("clip_score_hist.png", "nn_similarity_hist.png", "ngram_frequencies.png"):
        assert (out / "report" / plot).stat().st_size > 1000
    for i in range(res.n_shards):
        assert (out / f"shard_{i:05d}_stats.json").exists()


def test_resume_after_an_interrupted_build_gives_the_same_shards(corpus, models, tmp_path):
    root, _ = corpus
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    build_shards(root, clean, _config(models, tmp_path), progress=False)
    cfg2 = _config(models, tmp_path, workers=2)
    build_shards(root, resumed, cfg2, progress=False, max_chunks=2)  # "killed" after two chunks
    assert not list(resumed.glob("shard_*.tar"))
    (resumed / "_work" / "chunk_00003.parquet.tmp").write_bytes(b"half-written")  # debris of the kill
    build_shards(root, resumed, cfg2, progress=False)
    assert _statuses(clean) == _statuses(resumed)
    assert _tar_members(clean) == _tar_members(resumed)
    # A third run finds every shard's _stats.json and rewrites nothing.
    before = {f.name: f.stat().st_mtime_ns for f in resumed.glob("shard_*")}
    build_shards(root, resumed, cfg2, progress=False)
    assert before == {f.name: f.stat().st_mtime_ns for f in resumed.glob("shard_*")}


def _hooked(models, tmp_path, hook):
    return _config(models, tmp_path, ocr=None,
                   safety={"blocklist": str(models / "blocklist.txt"), "classifier": f"tests.data_curation.stage_hooks:{hook}"})


def test_a_stage_failing_on_one_sample_fails_that_sample_only(corpus, models, tmp_path):
    root, _ = corpus
    build_shards(root, tmp_path / "out", _hooked(models, tmp_path, "raise_on_hubble"), progress=False)
    rows = _statuses(tmp_path / "out")
    assert len(rows) == N_INPUTS
    assert (rows["hubble"]["status"], rows["hubble"]["stage"]) == ("error", "safety")
    assert rows["hubble"]["reason"] == "MemoryError: simulated"
    assert rows["astronaut"]["status"] == "ok"


def test_a_worker_that_dies_on_one_sample_costs_that_sample_only(corpus, models, tmp_path):
    """The hook kills its worker process (SIGSEGV) on one photo: that photo gets an error record naming the
    crash, and every other input, its chunk's neighbours included, ends as it does without the hook."""
    root, _ = corpus
    build_shards(root, tmp_path / "plain", _hooked(models, tmp_path, "raise_on_hubble"), progress=False)
    build_shards(root, tmp_path / "out", _hooked(models, tmp_path, "segfault_on_hubble"), progress=False)
    rows, plain = _statuses(tmp_path / "out"), _statuses(tmp_path / "plain")
    assert len(rows) == N_INPUTS
    assert (rows["hubble"]["status"], rows["hubble"]["stage"]) == ("error", "safety")
    assert rows["hubble"]["reason"].startswith("the worker processing it died")
    others = {k: (r["status"], r["stage"], r["reason"]) for k, r in rows.items() if k != "hubble"}
    assert others == {k: (r["status"], r["stage"], r["reason"]) for k, r in plain.items() if k != "hubble"}
    assert _tar_members(tmp_path / "out") == _tar_members(tmp_path / "plain")


def test_a_bad_stage_model_is_one_named_error(corpus, tmp_path, capsys):
    import yaml

    root, _ = corpus
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    cfg = {"dedup": {"sscd": str(tmp_path / "junk.pt"), "keep": "first"}, "clip": None, "workers": 2}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert build_shards_cli.main([str(root), str(tmp_path / "o"), "--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert "cannot set up the curation stages" in err and "junk.pt" in err


def test_bad_configs_and_inputs_are_named(corpus, models, tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("caption: {min_wrds: 3}\n")
    with pytest.raises(ConfigError, match="min_wrds"):
        load_config(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="dedup.sscd"):
        load_config(None)
    assert build_shards_cli.main([str(tmp_path / "missing"), str(tmp_path / "o"), "--config",
                                  str(tmp_path / "bad.yaml")]) == 2
    assert "min_wrds" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "ok.yaml").write_text("dedup: null\nclip: null\nresample: null\n")
    assert build_shards_cli.main([str(tmp_path / "empty"), str(tmp_path / "o"), "--config",
                                  str(tmp_path / "ok.yaml")]) == 2
    assert "empty" in capsys.readouterr().err
