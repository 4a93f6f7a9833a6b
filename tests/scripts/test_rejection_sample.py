"""scripts.rejection_sample: seeded samples, checker filtering and pass rates, reward ranking of the distinct
survivors, SFT shards the conversation codec reads, every prompt in status.jsonl, bad inputs named before any
model loads."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from adapters.chat import IGNORE_INDEX
from adapters.generation import SamplingConfig, collect_ids, generate, stream_text
from adapters.model_io import save_checkpoint
from adapters.multimodal import ImageBatch, build_multimodal
from adapters.reward import score_answers
from common.vqa_metrics import vqa_normalize
from media.image import load_image
from scripts import rejection_sample as rs
from scripts.demo_vqa import load_export
from tests.scripts.test_demo_vqa import read_jsonl, write_jsonl
from tests.scripts.test_evaluate import open_gates
from tests.tiny import build_tiny_tokenizer, build_tiny_vqa_model
from training.codecs import ImageConversationCodec
from training.data import ShardStream
from vision.tiling import collate_tiled, tile_image

SAMPLING = ["--n", "8", "--temperature", "1.5", "--max-new-tokens", "3"]
QUESTION = "What colour are the shapes?"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A policy export whose images matter, a reward model with a hand-set head, and three prompts: two images
    (one and several tiles) and a text-only one."""
    from PIL import Image

    root = tmp_path_factory.mktemp("rejection")
    tok = build_tiny_tokenizer(root)
    policy = build_tiny_vqa_model(tok, seed=0)
    open_gates(policy)
    policy_dir = save_checkpoint(policy, root / "policy", tokenizer_path=root / "tokenizer.model")
    base = build_tiny_vqa_model(tok, seed=1)
    rm = build_multimodal(replace(base.cfg, reward_head=True), base.lm)
    missing, unexpected = rm.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing == ["reward_head.weight", "reward_head.bias"]
    open_gates(rm)
    torch.manual_seed(2)
    with torch.no_grad():
        torch.nn.init.normal_(rm.reward_head.weight)
    rm_dir = save_checkpoint(rm, root / "rm", tokenizer_path=root / "tokenizer.model")
    folder = root / "prompts"
    (folder / "img").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(folder / "img" / "red.png")
    Image.new("RGB", (300, 70), (30, 30, 200)).save(folder / "img" / "wide.png")
    rows = [{"id": "red", "image": "img/red.png", "question": QUESTION},
            {"id": "wide", "image": "img/wide.png", "question": QUESTION},
            {"id": "text", "question": "How many?"}]
    return {"root": root, "tok": tok, "policy": policy_dir, "rm": rm_dir, "folder": folder, "rows": rows}


def run(setup, rows, out, *extra) -> int:
    prompts = write_jsonl(setup["folder"] / f"{out.name}.jsonl", rows)
    return rs.main(["--checkpoint", str(setup["policy"]), "--prompts", str(prompts), "--out", str(out), *extra])


def status(out: Path) -> dict[str, dict]:
    return {r["id"]: r for r in read_jsonl(out / "status.jsonl")}


def samples_of(setup, rows, n=8, temperatures=(1.5,), seed=0, max_new_tokens=3) -> dict[str, list[rs.Sample]]:
    """What the script samples for each row, drawn here through its `draw_samples`."""
    model = load_export(setup["policy"], None)
    prompts = rs.read_prompts(write_jsonl(setup["folder"] / "probe.jsonl", rows))
    out = {}
    for p in prompts:
        tiled = tile_image(load_image(p.image), rs.tiling_of(model)) if p.image else None
        out[p.id] = rs.draw_samples(model, setup["tok"], rs.prompt_ids(setup["tok"], p), tiled, n, temperatures,
                                    1.0, max_new_tokens, seed, p.id)
    return out


def distinct(samples: list[rs.Sample]) -> list[str]:
    return list(dict.fromkeys(s.text for s in samples if s.text))


def test_a_seeded_run_is_reproducible_and_a_prompts_samples_ignore_the_other_rows(setup, tmp_path):
    rows = setup["rows"]
    assert run(setup, rows, tmp_path / "a", *SAMPLING, "--keep", "8") == 0
    assert run(setup, rows[::-1], tmp_path / "b", *SAMPLING, "--keep", "8") == 0
    assert run(setup, rows, tmp_path / "c", *SAMPLING, "--keep", "8", "--seed", "1") == 0
    a, b, c = status(tmp_path / "a"), status(tmp_path / "b"), status(tmp_path / "c")
    assert a == b  # same samples per id, whatever the order of the file
    assert [r["kept"] for r in a.values()] != [c[k]["kept"] for k in a]
    drawn = samples_of(setup, rows)
    assert {k: r["kept"] for k, r in a.items()} == {k: distinct(s) for k, s in drawn.items()}
    assert all(len(set(r["kept"])) > 2 for r in a.values())  # the temperature makes them differ
    again = tmp_path / "a2"
    assert run(setup, rows, again, *SAMPLING, "--keep", "8") == 0
    assert (again / "shards" / "shard_00000.tar").read_bytes() == (tmp_path / "a" / "shards" / "shard_00000.tar"
                                                                   ).read_bytes()


def test_temperatures_cycle_over_the_samples(setup):
    samples = samples_of(setup, setup["rows"][:1], n=5, temperatures=(0.0, 1.5))["red"]
    assert [s.temperature for s in samples] == [0.0, 1.5, 0.0, 1.5, 0.0]
    model = load_export(setup["policy"], None)
    tok = setup["tok"]
    prompt = rs.read_prompts(write_jsonl(setup["folder"] / "one.jsonl", setup["rows"][:1]))[0]
    tiled = tile_image(load_image(prompt.image), rs.tiling_of(model))
    images = ImageBatch.from_collated(collate_tiled([[tiled]])).trimmed()
    ids = collect_ids(generate(model, torch.tensor([rs.prompt_ids(tok, prompt)]), images,
                               SamplingConfig(max_new_tokens=3), tok.stop_ids), tok.stop_ids)[0]
    greedy = "".join(stream_text(tok, ids, tok.stop_ids)).strip()
    assert [samples[i].text for i in (0, 2, 4)] == [greedy] * 3
    assert len({samples[1].text, samples[3].text, greedy}) > 1


def test_the_checker_drops_wrong_samples_and_prompts_the_model_rarely_gets_right(setup, tmp_path):
    drawn = samples_of(setup, setup["rows"])
    target = drawn["red"][0].text
    hits = [s.text for s in drawn["red"] if vqa_normalize(s.text) == vqa_normalize(target)]
    rows = [{**setup["rows"][0], "answers": [target]},
            {**setup["rows"][1], "answers": ["a giraffe standing on the moon"]},
            {**setup["rows"][2], "answers": [s.text for s in drawn["text"][:2]]}]
    assert run(setup, rows, tmp_path / "out", *SAMPLING, "--keep", "8") == 0
    got = status(tmp_path / "out")
    assert got["red"] == {"id": "red", "status": "kept", "reason": None, "n_samples": 8, "n_passed": len(hits),
                          "kept": list(dict.fromkeys(hits)), "rewards": None}
    assert got["wide"] == {"id": "wide", "status": "dropped", "reason": "no sample passed the checker",
                           "n_samples": 8, "n_passed": 0, "kept": [], "rewards": None}
    assert set(got["text"]["kept"]) <= {s.text for s in drawn["text"][:2]} and got["text"]["status"] == "kept"
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["config"]["checker"] == "vqa"  # the default when the rows have answers
    assert report["by_status"] == {"kept": 2, "dropped": 1}
    assert report["by_reason"] == {rs.EMPTY: 0, rs.NO_PASS: 1, rs.LOW_RATE: 0}

    rate = len(hits) / 8
    assert rate < 1
    above = f"{rate + 0.01:.2f}"
    assert run(setup, rows, tmp_path / "strict", *SAMPLING, "--min-pass-rate", above) == 0
    strict = status(tmp_path / "strict")
    assert strict["red"]["status"] == "dropped" and strict["red"]["reason"] == f"pass rate {rate:.2f} < {above}"
    assert strict["red"]["n_passed"] == len(hits) and strict["red"]["kept"] == []
    report = json.loads((tmp_path / "strict" / "report.json").read_text())
    assert report["by_reason"][rs.LOW_RATE] == 1 + (strict["text"]["status"] == "dropped")


def test_the_best_k_by_reward_are_kept(setup, tmp_path):
    assert run(setup, setup["rows"], tmp_path / "out", *SAMPLING, "--keep", "3", "--checker", "none",
               "--reward-model", str(setup["rm"])) == 0
    got = status(tmp_path / "out")
    rm, tok = load_export(setup["rm"], None), setup["tok"]
    prompts = {p.id: p for p in rs.read_prompts(setup["folder"] / "out.jsonl")}
    differs = False
    for key, samples in samples_of(setup, setup["rows"]).items():
        answers = distinct(samples)
        p = prompts[key]
        images = [tile_image(load_image(p.image), rs.tiling_of(rm))] if p.image else []
        rewards = score_answers(rm, tok, rs.prompt_ids(tok, p), images, answers)
        best = sorted(range(len(answers)), key=lambda i: -rewards[i])[:3]
        assert got[key]["kept"] == [answers[i] for i in best]
        assert got[key]["rewards"] == pytest.approx([rewards[i] for i in best])
        differs |= best != [0, 1, 2]
    assert differs  # the ranking is the reward's, not the sample order


def test_the_shards_are_sft_conversations_labelled_on_the_kept_answer(setup, tmp_path):
    out = tmp_path / "out"
    assert run(setup, setup["rows"], out, *SAMPLING, "--keep", "2", "--checker", "none", "--per-shard", "4",
               "--reward-model", str(setup["rm"]), "--json") == 0
    got = status(out)
    shards = sorted((out / "shards").iterdir())
    assert [s.name for s in shards] == ["shard_00000.tar", "shard_00001.tar"]  # 6 samples, 4 per shard
    model, tok = load_export(setup["policy"], None), setup["tok"]
    prompts = {p.id: p for p in rs.read_prompts(setup["folder"] / "out.jsonl")}
    codec = ImageConversationCodec(tok, rs.tiling_of(model))
    seen: dict[str, list] = {}
    for raw in ShardStream(shards, shuffle_buffer=1).epoch(0):
        meta = json.loads(raw.members["json"])["meta"]
        p = prompts[meta["id"]]
        answer = meta["conversations"][1]["content"]
        ex = codec.decode(raw)
        assert ex.tokens == rs.prompt_ids(tok, p) + tok.encode(answer) + [tok.eot_id]
        assert [t for t, lab in zip(ex.tokens, ex.labels) if lab != IGNORE_INDEX] == tok.encode(answer) + [tok.eot_id]
        assert len(ex.media) == (p.image is not None)
        if p.image:
            assert raw.members["png"] == p.image.read_bytes()
        assert meta["source"] == "rejection_sample" and meta["checker"] == "none"
        seen.setdefault(p.id, []).append((answer, meta["reward"]))
    assert {k: [a for a, _ in v] for k, v in seen.items()} == {k: r["kept"] for k, r in got.items()}
    assert {k: [r for _, r in v] for k, v in seen.items()} == {k: r["rewards"] for k, r in got.items()}


def test_every_prompt_is_accounted_for_and_a_rerun_clears_stale_shards(setup, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(setup, setup["rows"], out, *SAMPLING, "--keep", "8", "--per-shard", "1") == 0
    many = len(list((out / "shards").iterdir()))
    capsys.readouterr()
    rows = [{**setup["rows"][0], "answers": ["not what it says"]}, *setup["rows"][1:]]
    assert run(setup, rows, out, *SAMPLING, "--checker", "exact", "--json") == 2  # rows without answers
    assert len(list((out / "shards").iterdir())) == many and (out / "report.json").exists()  # left as they were
    rows = [{**r, "answers": ["not what it says"]} for r in setup["rows"]]
    assert run(setup, rows, out, *SAMPLING, "--checker", "exact", "--json") == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["id"] for r in read_jsonl(out / "status.jsonl")] == ["red", "wide", "text"]
    assert report["prompts"] == 3 and report["by_status"] == {"kept": 0, "dropped": 3}
    assert report["samples_written"] == 0 and report["shards"] == [] and many > 3
    assert list((out / "shards").iterdir()) == []


def test_checkers_fold_as_documented():
    assert rs.vqa_score("Two dogs.", ["2 dogs"]) == 1 and rs.exact_score("Two dogs.", ["2 dogs"]) == 0
    assert rs.exact_score("  Red  CAR", ["blue", "red car"]) == 1 and rs.exact_score("red", ["red car"]) == 0
    assert rs.vqa_score("red", ["red"] * 4 + ["crimson"]) == 1  # three others agree in every leave-one-out
    assert 0 < rs.vqa_score("crimson", ["red", "red", "red", "crimson"]) < 1
    assert rs.vqa_score("blue", ["red", "crimson"]) == 0


@pytest.fixture
def bad_media(setup, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "red.png").write_bytes((setup["folder"] / "img" / "red.png").read_bytes())
    return tmp_path


OK = {"id": "ok", "image": "red.png", "question": "q"}


@pytest.mark.parametrize("lines, where, message", [
    ([OK, {"id": "a", "image": "missing.png", "question": "q"}], ":2 (id 'a')", "image file not found"),
    ([{"id": "a", "image": "red.png"}], ":1 (id 'a')", "'question' must be a non-empty string"),
    ([{"id": "a", "question": "q", "answer": ["x"]}], ":1", "unknown keys ['answer']"),
    ([OK, {"id": "ok", "question": "q"}], ":2", "duplicate id 'ok' (first on line 1)"),
    ([{"id": "a", "image": "broken.png", "question": "q"}], ":1 (id 'a')", "bad image"),
    ([{"id": "a", "question": "<|image|>q"}], ":1 (id 'a')", "holds <|image|>"),
    ([{"id": "a", "question": "q", "answers": []}], ":1 (id 'a')", "'answers' must be a non-empty list"),
    ([{**OK, "answers": ["x"]}, {"id": "b", "question": "q"}], ":2 (id 'b')", "no 'answers': --checker vqa"),
    ([{"id": 7, "question": "q"}, {"id": "7", "question": "q"}], ":2", "duplicate id '7'"),
])
def test_bad_prompts_are_one_line_before_any_model_loads(setup, bad_media, capsys, monkeypatch, lines, where,
                                                          message):
    monkeypatch.setattr(rs, "load_export", lambda *a: pytest.fail("the model loaded"))
    prompts = write_jsonl(bad_media / "prompts.jsonl", lines)
    assert rs.main(["--checkpoint", str(setup["policy"]), "--prompts", str(prompts), "--out",
                    str(bad_media / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {prompts}{where}") and message in err and "\n" not in err
    assert not (bad_media / "out").exists()


def test_wrong_models_and_flags_are_refused(setup, tmp_path, capsys):
    rows = setup["rows"]
    assert run(setup, rows, tmp_path / "a", "--reward-model", str(setup["policy"])) == 2
    assert "has no reward head" in capsys.readouterr().err
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "t", "question": "q"}])
    assert rs.main(["--checkpoint", str(setup["rm"]), "--prompts", str(prompts), "--out", str(tmp_path / "b")]) == 2
    assert "is a reward model" in capsys.readouterr().err
    assert run(setup, rows, tmp_path / "c", "--min-pass-rate", "0.5") == 2  # no answers: no checker
    assert "--min-pass-rate needs a checker" in capsys.readouterr().err
    for extra in (["--keep", "0"], ["--min-pass-rate", "1.5"], ["--temperature", "-1"], ["--reward-lm", "x"]):
        with pytest.raises(SystemExit) as e:
            run(setup, rows, tmp_path / "d", *extra)
        assert e.value.code == 2
