"""synthetic/posttrain.py writes the post-training sets: two-image conversations in the LLaVA layout that the
shard builder reads, preference sidecars whose rejected answer names a wrong attribute, and held-out sets;
the same seed gives the same bytes."""

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from synthetic.posttrain import ATTRIBUTES, write_posttrain
from synthetic.shapes import QUESTIONS
from synthetic.tasks import SyntheticTaskError


def rows(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_sets_are_balanced_checked_and_reproducible(tmp_path):
    made = write_posttrain(tmp_path / "a", n_sft=40, n_pref=20, n_test=10, seed=3)
    records = json.loads(Path(made["sft"]).read_text())
    assert len(records) == 40
    two, one = records[0::2], records[1::2]  # two-image conversations, single-image ones mixed in
    for r in two:
        assert len(r["image"]) == 2 and all((tmp_path / "a" / "sft" / p).is_file() for p in r["image"])
        turns = r["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt", "human", "gpt"]
        assert turns[0]["value"].startswith("<image><image>")  # adjacent: the question sees both images
        assert turns[1]["value"] in ATTRIBUTES["shape"] and turns[3]["value"] in ATTRIBUTES["colour"]
    asked = Counter()
    for r in one:
        assert isinstance(r["image"], str) and (tmp_path / "a" / "sft" / r["image"]).is_file()
        turns = r["conversations"]
        assert turns[0]["value"].startswith("<image>") and turns[0]["value"].count("<image>") == 1
        kinds = [next(k for k, (q, _) in QUESTIONS.items() if q == turns[j]["value"].removeprefix("<image>"))
                 for j in (0, 2)]
        assert kinds[0] != kinds[1] and all(turns[j + 1]["value"] in QUESTIONS[k][1] for j, k in zip((0, 2), kinds))
        asked.update(kinds)
    assert set(asked) == set(QUESTIONS)  # every single-image skill is rehearsed
    pref = sorted((tmp_path / "a" / "preference").glob("*.json"))
    assert len(pref) == 20
    for p in pref:
        s = json.loads(p.read_text())
        assert s["chosen"] != s["rejected"] and {s["chosen"], s["rejected"]} <= set(ATTRIBUTES[s["kind"]])
        assert s["conversations"] == [{"role": "user", "content": "<|image|>" + QUESTIONS[s["kind"]][0]}]
        assert Image.open(p.with_suffix(".png")).size == (56, 56)
    assert Counter(json.loads(p.read_text())["kind"] for p in pref) == {"colour": 10, "shape": 10}
    multi = rows(made["multi_image"])
    assert len(multi) == 20 and Counter(m["kind"] for m in multi) == {"shape_of_colour": 10, "colour_of_shape": 10}
    assert all(m["conversation"][0]["content"].startswith("<|image|><|image|>") for m in multi)
    assert len(rows(made["pairs"])) == 10 and len(rows(made["questions"])) == len(rows(made["answers"])) == 20
    again = write_posttrain(tmp_path / "b", n_sft=40, n_pref=20, n_test=10, seed=3)
    files = lambda root: {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    assert files(tmp_path / "a") == files(tmp_path / "b") and again["n_sft"] == 40
    with pytest.raises(SyntheticTaskError, match="already exists and is not empty"):
        write_posttrain(tmp_path / "a", n_sft=1, n_pref=1, n_test=1, seed=0)
    with pytest.raises(SyntheticTaskError, match="n_test: 0 is not a whole number >= 1"):
        write_posttrain(tmp_path / "c", n_sft=1, n_pref=1, n_test=0, seed=0)
    assert not (tmp_path / "c").exists()  # refused before anything is written


def test_the_two_image_answers_follow_from_the_scenes(tmp_path):
    """The scenes differ in colour and shape; each question names one scene's attribute, so the answer is the
    other attribute of that same scene (read back from the pixels' dominant non-background colour)."""
    from synthetic.shapes import COLOURS

    made = write_posttrain(tmp_path, n_sft=1, n_pref=1, n_test=12, seed=0)
    for m in rows(made["multi_image"]):
        found = []
        for path in m["images"]:
            img = Image.open(Path(made["multi_image"]).parent / path).convert("RGB")
            found.append(next(name for name, rgb in COLOURS.items() if rgb in {c for _, c in img.getcolors(1 << 16)}))
        assert found[0] != found[1]
        if m["kind"] == "colour_of_shape":
            assert m["answer"] in found and m["conversation"][1]["content"] in ATTRIBUTES["shape"]
