"""LLaVA JSON conversations through the image shard builder: multi-image and text-only records, every bad kind
named in the status parquet, the per-image stages, resume, and the shards read back by the trainer's codec."""

import io
import json
import re

import pytest
import torch
import yaml
from PIL import Image
from skimage import data as skdata

from adapters.chat import image_input_id
from common.conversation import ConversationError, check_conversation
from data_curation.curation_config import load_config
from data_curation.input_files import CurationInputError
from data_curation.llava_reader import place_images
from data_curation.readers import open_input
from data_curation.safety import PHashBlocklist
from data_curation.shards import build_shards
from data_curation.sscd import build_sscd
from scripts import build_shards as build_shards_cli
from tests.data_curation.test_shards import _statuses
from tests.data_curation.test_shards import _tar_members as _members
from tests.tiny import build_tiny_tokenizer
from training.codecs import ImageConversationCodec, sample_media
from training.data import ShardStream
from vision.clip import build_clip, open_clip_model_cfg
from vision.encoder import vision_config
from vision.tiling import TilingConfig

PHOTOS = {"cat.jpg": skdata.chelsea, "coffee.jpg": skdata.coffee, "rocket.jpg": skdata.rocket,
          "sub/coins.png": skdata.coins, "blocked.jpg": skdata.hubble_deep_field}
ASK = "What can you see in this photo of everyday things?"
ANSWER = "The photo shows a cup of coffee on a small white saucer."
ASK2 = "Which of the two pictures is brighter, and why do you think so?"
ANSWER2 = "The second picture is brighter because it was taken in daylight."


def human(value):
    return {"from": "human", "value": value}


def gpt(value):
    return {"from": "gpt", "value": value}


GOOD = {  # id -> (image field, conversations, images written)
    "one": ("cat.jpg", [human(f"<image>\n{ASK}"), gpt(ANSWER)], 1),
    "two": (["cat.jpg", "coffee.jpg"], [human("Compare <image> with <image> please."), gpt(ANSWER2),
                                        human(ASK), gpt(ANSWER)], 2),
    "unplaced": (["rocket.jpg", "sub/coins.png"], [{"from": "system", "value": "Answer in full sentences."},
                                                   human(ASK2), gpt(ANSWER2)], 2),
    "text": (None, [human("Why is the sky blue during a clear summer day?"),
                    gpt("Sunlight is scattered by the air, and blue light is scattered the most.")], 0),
    "same": ("cat.jpg", [human(f"{ASK} <image>"), gpt("A tabby cat that is looking to the side.")], 1),
}
BAD = {  # id -> (image field, conversations, status, stage, reason pattern)
    "missing": ("nope.jpg", [human(f"<image>{ASK}"), gpt(ANSWER)], "error", "read", "image file not found: .*nope.jpg"),
    "count": ("cat.jpg", [human(f"<image> and <image>? {ASK}"), gpt(ANSWER)], "error", "conversation",
              r"conversations hold 2 <image> placeholder\(s\) but image names 1 file"),
    "order": (None, [gpt(ANSWER), human(ASK)], "error", "conversation",
              r"conversations\[0\].role is 'assistant' where 'user' belongs"),
    "noanswer": (None, [human(ASK)], "error", "conversation", r"no assistant turn after conversations\[0\]"),
    "from": (None, [{"from": "bot", "value": ASK}, gpt(ANSWER)], "error", "conversation",
             r"conversations\[0\].from 'bot' is not one of \('human', 'gpt', 'system'\)"),
    "value": (None, [human(ASK), {"from": "gpt", "value": 42}], "error", "conversation",
              r"conversations\[1\].value is an int, not a string"),
    "noturns": ("cat.jpg", None, "error", "conversation", "conversations is missing"),
    "imagetype": ({"path": "cat.jpg"}, [human(ASK), gpt(ANSWER)], "error", "conversation", "image is a dict"),
    "blocked": (["cat.jpg", "blocked.jpg"], [human(f"<image> <image> {ASK2}"), gpt(ANSWER2)], "dropped", "safety",
                r"image 1: phash_blocklist"),
    "small": (["tiny.jpg"], [human(f"<image>{ASK}"), gpt(ANSWER)], "dropped", "image", r"image 0: too_small"),
    "german": (None, [human("Was siehst du auf dem Bild mit dem Astronauten im weissen Raumanzug?"),
                      gpt("Ein Astronaut im weissen Raumanzug steht neben der Flagge")], "dropped", "language",
               "language"),
}
N_RECORDS = len(GOOD) + len(BAD) + 1  # + one record that is not an object
TILING = TilingConfig(tile_size=56, max_tiles=2)


def _record(rid, image, conversations):
    rec = {"id": rid, "source_dataset": "tiny"}
    if image is not None:
        rec["image"] = image
    if conversations is not None:
        rec["conversations"] = conversations
    return rec


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """llava.json beside its images (one in a subfolder, one PNG, one too small, one on the blocklist)."""
    root = tmp_path_factory.mktemp("llava")
    (root / "sub").mkdir()
    for name, load in PHOTOS.items():
        Image.fromarray(load()).convert("RGB").resize((160, 120)).save(root / name)
    Image.new("RGB", (20, 20), "red").save(root / "tiny.jpg")
    records = [_record(rid, image, conv) for rid, (image, conv, _) in GOOD.items()]
    records += [_record(rid, image, conv) for rid, (image, conv, *_) in BAD.items()]
    records.append("not an object")
    (root / "llava.json").write_text(json.dumps(records))
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory, dataset):
    d = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    vision = vision_config("tiny")
    (d / "clip").mkdir()
    (d / "clip" / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip_model_cfg(vision)}))
    torch.save(build_clip(vision).state_dict(), d / "clip" / "open_clip_pytorch_model.bin")
    torch.save(build_sscd("tiny").state_dict(), d / "sscd.pt")
    blocklist = PHashBlocklist.from_hashes([])
    blocklist.add(Image.open(dataset / "blocked.jpg").convert("RGB"))
    blocklist.save(d / "blocklist.txt")
    (d / "vocab.txt").write_text("photo\ncoffee\ncat\n")
    return d


def _config(tmp_path, models=None, **over):
    """Safety (blocklist, face blur) and language on, OCR off. With ``models``: CLIP whose threshold no pair can
    reach, de-duplication calling everything a copy, resampling keeping almost nothing: stages a conversation
    record must not go through."""
    cfg = {"samples_per_shard": 4, "workers": 1, "ocr": None, "clip": None, "dedup": None, "resample": None,
           "safety": {"blocklist": str(models / "blocklist.txt")} if models else {"blur_faces": False}}
    if models is not None:
        cfg.update(clip={"model": f"local-dir:{models / 'clip'}", "pretrained": None, "threshold": 1.5},
                   dedup={"sscd": str(models / "sscd.pt"), "threshold": -1.0, "keep": "first", "clusters": 1},
                   resample={"vocab": str(models / "vocab.txt"), "t": 0.01, "keep_unmatched": False})
    cfg.update(over)
    path = tmp_path / "curation.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path)


def _by_id(out, members):
    """id -> (key, that key's members without the key)."""
    keys = {json.loads(v)["meta"]["id"]: name.split(".")[0] for name, v in members.items() if name.endswith(".json")}
    return {rid: (key, {n.removeprefix(key + ".") for n in members if n.split(".")[0] == key})
            for rid, key in keys.items()}


@pytest.fixture(scope="module")
def built(dataset, models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("build")
    out = tmp / "out"
    result = build_shards(dataset / "llava.json", out, _config(tmp, models), progress=False)
    return out, result


def test_every_record_has_one_status_with_its_named_reason(built, dataset):
    out, result = built
    rows = list(_statuses(out).values())
    assert len(rows) == N_RECORDS == result.n_inputs and sum(result.counts.values()) == N_RECORDS
    by_index = {int(r["source"].rpartition(":")[2]): r for r in rows}
    ids = [*GOOD, *BAD, None]
    for i, rid in enumerate(ids):
        r = by_index[i]
        if rid in GOOD:
            assert (r["status"], r["reason"]) == ("ok", None), r
        elif rid in BAD:
            _, _, status, stage, pattern = BAD[rid]
            assert (r["status"], r["stage"]) == (status, stage), r
            assert re.search(pattern, r["reason"]), (pattern, r["reason"])
            if stage in ("read", "conversation"):  # the reader names the record and its id
                assert r["reason"].startswith(f"llava.json record {i}: ")
                assert r["reason"].endswith(f" (id {rid!r})")
        else:
            assert (r["status"], r["stage"], r["reason"]) == ("error", "conversation",
                                                             f"llava.json record {i}: a str, not a record object")
    report = json.loads((out / "report.json").read_text())
    assert report["counts"] == {"kept": len(GOOD), "dropped": 3, "error": len(BAD) - 3 + 1}
    kinds = report["by_reason"]  # reasons counted by kind, not by record (the id comes last, in parentheses)
    assert kinds["conversation:*.json record #: conversations hold # <image> placeholder"] == 1
    assert kinds["read:*.json record #: image file not found: *"] == 1 and sum(kinds.values()) == len(BAD) + 1


def test_members_and_key_json_follow_the_trainers_conversation_layout(built, dataset):
    out, _ = built
    members = _members(out)
    found = _by_id(out, members)
    assert set(found) == set(GOOD)  # nothing CLIP-filtered, de-duplicated or resampled ("one" and "same" share cat.jpg)
    assert found["one"][1] == found["same"][1] == {"jpg", "json"}
    assert found["two"][1] == found["unplaced"][1] == {"0.jpg", "1.jpg", "json"}
    assert found["text"][1] == {"json"}
    key, _ = found["two"]
    assert members[f"{key}.0.jpg"] == (dataset / "cat.jpg").read_bytes()  # untouched JPEGs are copied, in order
    assert members[f"{key}.1.jpg"] == (dataset / "coffee.jpg").read_bytes()
    record = json.loads(members[f"{key}.json"])
    assert record["meta"]["conversations"] == [
        {"role": "user", "content": "Compare <|image|> with <|image|> please."},
        {"role": "assistant", "content": ANSWER2}, {"role": "user", "content": ASK},
        {"role": "assistant", "content": ANSWER}]
    assert record["meta"]["source_dataset"] == "tiny" and record["meta"]["image"] == ["cat.jpg", "coffee.jpg"]
    assert "caption" not in record and "clip_score" not in record and "dedup_component" not in record
    assert [(im["width"], im["height"]) for im in record["images"]] == [(160, 120), (160, 120)]
    assert all("phash" in im for im in record["images"]) and record["lang"] == "en"
    key, _ = found["unplaced"]  # LLaVA's convention: the images open the first human turn
    turns = json.loads(members[f"{key}.json"])["meta"]["conversations"]
    assert turns[0] == {"role": "system", "content": "Answer in full sentences."}
    assert turns[1] == {"role": "user", "content": f"<|image|><|image|>\n{ASK2}"}
    png = Image.open(io.BytesIO(members[f"{key}.1.jpg"]))
    assert png.format == "JPEG" and png.size == (160, 120)  # the PNG is re-encoded


def test_the_shards_decode_through_the_trainers_conversation_codec(built, tmp_path):
    out, _ = built
    texts = [ASK, ANSWER, ASK2, ANSWER2, "Compare", "Answer in full sentences."]
    tok = build_tiny_tokenizer(tmp_path / "tok", texts=texts)
    codec = ImageConversationCodec(tok, TILING)
    members = _members(out)
    found = _by_id(out, members)
    raws = {r.key: r for r in ShardStream(sorted(out.glob("shard_*.tar")), shuffle_buffer=1).epoch(0)}
    assert len(raws) == len(GOOD)
    for rid, (_, _, n_images) in GOOD.items():
        raw = raws[found[rid][0]]
        ex = codec.decode(raw)
        assert len(ex.media) == len(sample_media(raw)) == n_images, rid
        assert ex.tokens.count(image_input_id(tok)) == n_images, rid


def test_resume_after_an_interrupted_build_gives_the_same_shards(dataset, tmp_path):
    cfg = _config(tmp_path)
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    build_shards(dataset / "llava.json", clean, cfg, progress=False)
    build_shards(dataset / "llava.json", resumed, cfg, progress=False, max_chunks=2)
    assert not list(resumed.glob("shard_*.tar"))
    build_shards(dataset / "llava.json", resumed, cfg, progress=False)
    assert _statuses(clean) == _statuses(resumed) and len(_statuses(clean)) == N_RECORDS
    assert _members(clean) == _members(resumed)
    before = {f.name: f.stat().st_mtime_ns for f in resumed.glob("shard_*")}
    build_shards(dataset / "llava.json", resumed, cfg, progress=False)
    assert before == {f.name: f.stat().st_mtime_ns for f in resumed.glob("shard_*")}


def test_jsonl_input_and_image_folder(dataset, tmp_path):
    """A .jsonl whose rows have conversations is a LLaVA file; image_folder moves where image paths start."""
    rows = [_record("one", "cat.jpg", GOOD["one"][1]), _record("text", None, GOOD["text"][1])]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n{broken\n")
    samples = list(open_input(path, image_folder=dataset))
    assert [s.key for s in samples] == ["chat_000000001", "chat_000000002", "chat_000000004"]
    assert [len(s.images or []) for s in samples[:2]] == [1, 0] and samples[2].status == "error"
    assert "chat.jsonl line 4 is not valid JSON" in samples[2].reason
    first = next(open_input(path))  # without image_folder the paths start beside chat.jsonl: no cat.jpg there
    assert first.status == "error" and "chat.jsonl line 1: image file not found" in first.reason
    out = tmp_path / "out"
    build_shards(path, out, _config(tmp_path, image_folder=str(dataset)), progress=False)
    assert [r["status"] for r in _statuses(out).values()] == ["ok", "ok", "error"]
    (tmp_path / "caption.jsonl").write_text(json.dumps({"image": "x.jpg", "caption": "a caption"}) + "\n")
    (row,) = open_input(tmp_path / "caption.jsonl")  # a caption manifest is still one
    assert row.images is None and "x.jpg" in row.reason


def test_a_json_file_that_is_not_a_list_of_records_is_an_error_naming_it(dataset, tmp_path, capsys):
    (tmp_path / "dict.json").write_text(json.dumps({"id": "1", "conversations": []}))
    (tmp_path / "broken.json").write_text("[{\"id\": 1,")
    with pytest.raises(CurationInputError, match=r"dict.json: a LLaVA JSON file holds a list of records, not a dict"):
        open_input(tmp_path / "dict.json")
    with pytest.raises(CurationInputError, match=r"broken.json: not a readable LLaVA JSON file"):
        open_input(tmp_path / "broken.json")
    (tmp_path / "ok.yaml").write_text("dedup: null\nclip: null\nresample: null\n")
    assert build_shards_cli.main([str(tmp_path / "broken.json"), str(tmp_path / "o"), "--config",
                                  str(tmp_path / "ok.yaml")]) == 2
    assert "broken.json" in capsys.readouterr().err


def test_the_shared_conversation_checker_and_image_placement():
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert check_conversation(turns) == [("user", "Hi"), ("assistant", "Hello")]
    assert place_images(turns, 2)[0]["content"] == "<|image|><|image|>\nHi" and turns[0]["content"] == "Hi"
    with pytest.raises(ConversationError, match=r"conversations\[1\].content: <\|image\|> in the assistant turn"):
        check_conversation([turns[0], {"role": "assistant", "content": "<|image|>"}])
    with pytest.raises(ConversationError, match="no 'conversations' list"):
        check_conversation([])
