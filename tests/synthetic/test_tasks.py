"""make_synthetic writes each task as raw files: sidecars for the builders, a held-out question set and its
answer key; the same seed gives the same bytes; bad arguments are one line and exit code 2."""

import json
from pathlib import Path

import pytest

from scripts import make_synthetic
from synthetic import digits
from synthetic.motion import QUESTION as MOTION_QUESTION
from synthetic.shapes import QUESTIONS
from synthetic.tasks import SyntheticTaskError, write_task
from tests.system_deps import require_binary


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_image_vqa_train_sidecars_and_held_out_questions(tmp_path):
    summary = write_task("image-vqa", tmp_path, n_train=8, n_test=3, seed=0)
    train, test = tmp_path / "train", tmp_path / "test"
    sidecars = [json.loads((train / f"{i:05d}.json").read_text()) for i in range(8)]
    assert sorted(p.name for p in train.glob("*.png")) == [f"{i:05d}.png" for i in range(8)]
    kinds = list(QUESTIONS)
    for i, s in enumerate(sidecars):
        assert set(s) == {"caption", "question", "answer", "kind"}
        # the caption is alt text stating every fact of the scene ("two red circles on the left")
        assert s["answer"] in s["caption"] and len(s["caption"].split()) == 6
        assert s["kind"] == kinds[i % 4] and s["question"] == QUESTIONS[s["kind"]][0]
        assert s["answer"] in QUESTIONS[s["kind"]][1]
    questions, answers = _rows(test / "questions.jsonl"), _rows(test / "answers.jsonl")
    assert summary["test_questions"] == len(questions) == len(answers) == 3 * 4  # every kind per scene
    ids = [q["id"] for q in questions]
    assert ids == [a["id"] for a in answers] and len(set(ids)) == 12
    for q, a in zip(questions, answers):
        assert set(q) == {"id", "image", "question", "kind"} and (test / q["image"]).is_file()
        assert q["kind"] == a["kind"] and a["answer"] in QUESTIONS[a["kind"]][1]


def test_video_motion_rows_name_their_clips(tmp_path):
    write_task("video-motion", tmp_path, n_train=4, n_test=4, seed=1)
    sidecars = [json.loads(p.read_text()) for p in sorted((tmp_path / "train").glob("*.json"))]
    assert sorted(s["answer"] for s in sidecars) == ["down", "left", "right", "up"]  # balanced directions
    assert all(s["kind"] == "direction" and s["question"] == MOTION_QUESTION for s in sidecars)
    questions = _rows(tmp_path / "test" / "questions.jsonl")
    assert all((tmp_path / "test" / q["video"]).read_bytes()[4:8] == b"ftyp" for q in questions)
    held_out = sorted(a["answer"] for a in _rows(tmp_path / "test" / "answers.jsonl"))
    assert held_out == ["down", "left", "right", "up"]


def test_spoken_digits_have_transcripts_and_no_question(tmp_path):
    require_binary("espeak-ng")
    write_task("spoken-digits", tmp_path, n_train=2, n_test=2, seed=0)
    for p in sorted((tmp_path / "train").glob("*.json")):
        s = json.loads(p.read_text())
        assert "question" not in s and s["kind"] == "transcript" and s["caption"] == s["answer"]
        assert set(s["answer"].split()) <= set(digits.DIGITS) and s["voice"] in digits.VOICES
        assert p.with_suffix(".wav").is_file()
    questions = _rows(tmp_path / "test" / "questions.jsonl")
    assert all(set(q) == {"id", "audio", "kind"} for q in questions)
    assert all((tmp_path / "test" / q["audio"]).is_file() for q in questions)


def test_video_motion_stills_ask_the_place_and_middle_frames_the_direction(tmp_path):
    from PIL import Image

    from synthetic.motion import PLACES, POSITION_QUESTION

    write_task("video-motion", tmp_path, n_train=4, n_test=4, seed=2)
    stills = sorted((tmp_path / "frames").glob("*.png"))
    assert len(stills) == 3 * 4  # first, middle and last frame of every train clip
    for png in stills:
        side = json.loads(png.with_suffix(".json").read_text())
        assert side["question"] == POSITION_QUESTION and side["answer"] in PLACES and side["kind"] == "position"
        assert side["caption"].endswith(side["answer"]) and (tmp_path / "train" / side["clip"]).is_file()
        assert Image.open(png).size == (56, 56)
    middles = sorted((tmp_path / "middle_frames").glob("*.png"))
    assert len(middles) == 4 and {p.name for p in middles} <= {p.name for p in stills}
    for png in middles:  # the image-only baseline's set: the clip's direction asked of one frame
        side = json.loads(png.with_suffix(".json").read_text())
        clip = json.loads((tmp_path / "train" / side["clip"]).with_suffix(".json").read_text())
        assert side["question"] == MOTION_QUESTION and side["answer"] == side["caption"] == clip["answer"]
        assert side["kind"] == "direction"
        assert (tmp_path / "frames" / png.name).read_bytes() == png.read_bytes()  # the same still
    test = tmp_path / "test"
    clip_answers = {a["id"]: a["answer"] for a in _rows(test / "answers.jsonl")}
    questions, answers = _rows(test / "frame_questions.jsonl"), _rows(test / "frame_answers.jsonl")
    assert [q["id"] for q in questions] == [a["id"] for a in answers] and len(questions) == 2 * 4
    for q, a in zip(questions, answers):  # the first and last frames: the middle one is always "middle centre"
        assert (test / q["image"]).is_file() and q["kind"] == a["kind"] == "position"
        assert q["question"] == POSITION_QUESTION and a["answer"] in PLACES
    questions, answers = _rows(test / "middle_frame_questions.jsonl"), _rows(test / "middle_frame_answers.jsonl")
    assert [q["id"] for q in questions] == [a["id"] for a in answers] == list(clip_answers)
    for q, a in zip(questions, answers):  # the clip's own question id and answer: one key scores clip and frame
        assert (test / q["image"]).is_file() and q["question"] == MOTION_QUESTION and q["kind"] == "direction"
        assert clip_answers[a["id"]] == a["answer"]


@pytest.mark.parametrize("task", ["image-vqa", "video-motion", "spoken-digits"])
def test_the_same_seed_gives_the_same_files(tmp_path, task):
    if task == "spoken-digits":
        require_binary("espeak-ng")
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        write_task(task, tmp_path / name, n_train=3, n_test=2, seed=seed)
    a, b, c = (_files(tmp_path / n) for n in "abc")
    top = [k for k in a if k.startswith(("train/", "test/")) and k.count("/") == 1 and "frame_" not in k]
    assert a == b and len(top) == 3 * 2 + 2 + 2  # video-motion: stills and their questions besides
    assert a != c
    # train and held out come from different seeds: no held-out scene is a train scene
    train = {v for k, v in a.items() if k.startswith("train/") and not k.endswith(".json")}
    assert not train & {v for k, v in a.items() if k.startswith("test/") and not k.endswith(".jsonl")}


def test_cli_writes_a_task_and_documents_itself(tmp_path, capsys):
    assert make_synthetic.main(["image-vqa", str(tmp_path), "--n-train", "2", "--n-test", "1", "--seed", "0",
                                "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["train"] == 2 and Path(summary["answers"]).is_file()
    with pytest.raises(SystemExit) as e:
        make_synthetic.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0 and "same task, counts and seed give the same files" in help_text


@pytest.mark.parametrize("argv, message", [
    (["pictures", "OUT", "--n-train", "1", "--n-test", "1", "--seed", "0"], "invalid choice: 'pictures'"),
    (["image-vqa", "OUT", "--n-train", "1", "--n-test", "1"], "--seed"),
    (["image-vqa", "OUT", "--n-train", "x", "--n-test", "1", "--seed", "0"], "invalid int value: 'x'"),
    (["image-vqa", "OUT", "--n-train", "0", "--n-test", "1", "--seed", "0"],
     "n_train: 0 is not a whole number >= 1"),
    (["video-motion", "OUT", "--n-train", "1", "--n-test", "1", "--seed", "-1"], "seed: -1 is not"),
])
def test_bad_arguments_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        raise SystemExit(make_synthetic.main(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err
    assert err.count("\n") == 1 and err.startswith("make_synthetic: ")


def test_an_used_out_is_refused_not_mixed(tmp_path, capsys):
    write_task("image-vqa", tmp_path, n_train=2, n_test=1, seed=0)
    with pytest.raises(SyntheticTaskError, match="train already exists and is not empty"):
        write_task("image-vqa", tmp_path, n_train=1, n_test=1, seed=0)
    argv = ["image-vqa", str(tmp_path), "--n-train", "1", "--n-test", "1", "--seed", "0"]
    assert make_synthetic.main(argv) == 2
    assert "remove it or choose another OUT" in capsys.readouterr().err


def test_missing_espeak_is_one_line_with_the_install_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(digits.shutil, "which", lambda name: None)
    assert make_synthetic.main(["spoken-digits", str(tmp_path), "--n-train", "1", "--n-test", "1",
                                "--seed", "0"]) == 2
    err = capsys.readouterr().err
    assert "espeak-ng not found" in err and "apt-get install espeak-ng" in err and err.count("\n") == 1


@pytest.mark.parametrize("task", ["image-vqa", "video-motion"])
def test_make_synthetic_writes_a_tokenizer_trained_on_the_task(tmp_path, capsys, task):
    from adapters.tokenizer import Tokenizer

    assert make_synthetic.main([task, str(tmp_path), "--n-train", "4", "--n-test", "1", "--seed", "0", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    tok = Tokenizer(summary["tokenizer"])
    assert summary["tokenizer"] == str(tmp_path / "tokenizer.model")
    questions = _rows(tmp_path / "test" / "questions.jsonl")
    for q in questions:  # the task's strings got merges: far fewer tokens than bytes, and they round-trip
        ids = tok.encode(q["question"])
        assert tok.decode(ids) == q["question"] and len(ids) <= len(q["question"]) // 3
    for a in _rows(tmp_path / "test" / "answers.jsonl"):
        assert len(tok.encode(a["answer"])) == 1


def test_tiny_tokenizer_needs_texts(tmp_path):
    from adapters.tokenizer import build_tiny_tokenizer

    with pytest.raises(ValueError, match="no texts"):
        build_tiny_tokenizer(tmp_path, [])
