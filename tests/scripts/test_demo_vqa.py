"""demo_vqa: bad arguments are one error line and exit status 2; --lm finds an export's LM elsewhere."""

import json
import shutil
from pathlib import Path

import pytest

from adapters.checkpoint import save_meta_checkpoint
from adapters.model_io import save_checkpoint
from scripts import demo_vqa
from tests.tiny import build_tiny_tokenizer, build_tiny_vqa_model, tiny_asr_config

ASSET = Path(__file__).resolve().parents[2] / "assets" / "coffee.jpg"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny export without its LM (lm/ beside it), and its tokenizer."""
    root = tmp_path_factory.mktemp("demo_vqa")
    tok = build_tiny_tokenizer(root)
    model = build_tiny_vqa_model(tok, seed=0)
    lm = save_meta_checkpoint(model.lm, root / "lm")
    ckpt = save_checkpoint(model, root / "ckpt", tokenizer_path=root / "tokenizer.model", lm_path=lm)
    return {"root": root, "ckpt": ckpt, "lm": lm, "max_seq_len": model.cfg.lm.max_seq_len}


def run(ckpt, *extra):
    return demo_vqa.main(["--image", str(ASSET), "--question", "What colour are the shapes?",
                          "--checkpoint", str(ckpt), *extra])


@pytest.mark.parametrize("flag, value, message", [
    ("--max-new-tokens", "-5", "argument --max-new-tokens: must be >= 1, got -5"),
    ("--max-new-tokens", "many", "argument --max-new-tokens: expected an integer, got 'many'"),
    ("--temperature", "-0.1", "argument --temperature: must be >= 0 (0 = greedy), got -0.1"),
    ("--top-p", "0", "argument --top-p: must be in (0, 1], got 0"),
    ("--top-p", "1.5", "argument --top-p: must be in (0, 1], got 1.5"),
    ("--top-p", "nan", "argument --top-p: must be in (0, 1], got nan"),
    ("--top-k", "-1", "argument --top-k: must be >= 0 (0 = off), got -1"),
    ("--top-k", "2.5", "argument --top-k: expected an integer, got '2.5'"),
])
def test_bad_sampling_arguments_exit_2_with_one_line(assets, capsys, flag, value, message):
    with pytest.raises(SystemExit) as e:
        run(assets["ckpt"], flag, value)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip().splitlines()[-1].endswith(message) and "Traceback" not in err


def test_more_new_tokens_than_the_context_holds(assets, capsys):
    assert run(assets["ckpt"], "--max-new-tokens", str(assets["max_seq_len"])) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("error: --max-new-tokens: the prompt (")
    assert f"max_seq_len ({assets['max_seq_len']})" in err


def test_lm_flag_finds_a_moved_lm_and_refuses_another(assets, capsys, tmp_path):
    ckpt = shutil.copytree(assets["ckpt"], tmp_path / "ckpt")
    meta = json.loads((ckpt / "config.json").read_text())
    meta["lm_path"], meta["lm_path_relative"] = str(tmp_path / "gone"), "gone"
    (ckpt / "config.json").write_text(json.dumps(meta))
    assert run(ckpt, "--max-new-tokens", "3") == 2
    assert "pass --lm PATH" in capsys.readouterr().err
    assert run(ckpt, "--max-new-tokens", "3", "--lm", str(assets["lm"])) == 0
    assert capsys.readouterr().out.endswith("\n")
    other_model = build_tiny_vqa_model(demo_vqa.Tokenizer(ckpt / "tokenizer.model"), seed=5)
    other = save_meta_checkpoint(other_model.lm, tmp_path / "other")
    assert run(ckpt, "--max-new-tokens", "3", "--lm", str(other)) == 2
    err = capsys.readouterr().err
    assert str(other) in err and "fingerprint" in err


def test_lm_flag_needs_our_checkpoint(assets, capsys):
    with pytest.raises(SystemExit) as e:
        demo_vqa.main(["--image", str(ASSET), "--question", "q", "--mllama", str(assets["root"]),
                       "--lm", str(assets["lm"])])
    assert e.value.code == 2 and "--lm goes with --checkpoint" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- batch mode


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def held_out(assets):
    """A questions file in its own folder: one image beside it (relative path), the repo's JPEG (absolute)."""
    from PIL import Image

    folder = assets["root"] / "held_out"
    (folder / "img").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(folder / "img" / "red.png")
    rows = [{"id": "q1", "image": "img/red.png", "question": "What colour are the shapes?", "kind": "colour"},
            {"id": "q2", "image": str(ASSET), "question": "How many shapes are there?", "kind": "count"},
            {"id": "q0", "image": "img/red.png", "question": "How many shapes are there?", "kind": "count"}]
    return write_jsonl(folder / "questions.jsonl", rows), rows


def run_batch(ckpt, questions, out, *extra):
    return demo_vqa.main(["--questions", str(questions), "--out", str(out), "--checkpoint", str(ckpt),
                          "--max-new-tokens", "4", *extra])


def test_batch_answers_equal_single_answers_in_input_order(assets, held_out, capsys, tmp_path, monkeypatch):
    from adapters import model_io

    questions, rows = held_out
    monkeypatch.chdir(tmp_path)  # relative media paths resolve against the questions file, not the cwd
    loads = []
    real_load = model_io.load_checkpoint
    monkeypatch.setattr(model_io, "load_checkpoint", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    out = tmp_path / "preds" / "predictions.jsonl"
    assert run_batch(assets["ckpt"], questions, out) == 0
    err = capsys.readouterr().err
    assert len(loads) == 1  # the model loads once for the whole file
    assert f"demo_vqa: answered 3 rows" in err and str(out) in err
    preds = read_jsonl(out)
    assert [p["id"] for p in preds] == ["q1", "q2", "q0"] and all(set(p) == {"id", "answer"} for p in preds)
    assert all(p["answer"].strip() for p in preds)  # an untrained model still says something to compare
    for row, pred in zip(rows, preds):
        image = row["image"] if row["image"].startswith("/") else str(questions.parent / row["image"])
        assert demo_vqa.main(["--image", image, "--question", row["question"], "--checkpoint",
                              str(assets["ckpt"]), "--max-new-tokens", "4"]) == 0
        assert capsys.readouterr().out == pred["answer"] + "\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["predictions.jsonl"]  # no temporary left


def test_predictions_are_renamed_into_place(assets, held_out, tmp_path, monkeypatch):
    from common import export

    renames = []
    real_replace = export.os.replace

    def spy(src, dst):
        renames.append((Path(src), Path(dst), Path(src).read_text()))
        real_replace(src, dst)

    monkeypatch.setattr(export.os, "replace", spy)
    out = tmp_path / "predictions.jsonl"
    assert run_batch(assets["ckpt"], held_out[0], out) == 0
    [(src, dst, text)] = renames
    assert dst == out and src.parent == out.parent and src != out
    assert text == out.read_text() and len(text.splitlines()) == 3


def test_a_failing_row_leaves_no_predictions_file(assets, held_out, capsys, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows = [{**r, "image": str(held_out[0].parent / r["image"])} for r in read_jsonl(held_out[0])]
    rows[1]["image"] = str(bad)
    questions = write_jsonl(tmp_path / "q.jsonl", rows)
    out = tmp_path / "predictions.jsonl"
    out.write_text("an earlier run's complete file\n")
    assert run_batch(assets["ckpt"], questions, out) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: {questions}:2 (id 'q2'): ") and "broken.png" in err
    assert out.read_text() == "an earlier run's complete file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.png", "predictions.jsonl", "q.jsonl"]


def test_an_answer_that_cannot_fit_names_the_row(assets, held_out, capsys, tmp_path):
    out = tmp_path / "predictions.jsonl"
    assert run_batch(assets["ckpt"], held_out[0], out, "--max-new-tokens", str(assets["max_seq_len"])) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {held_out[0]}:1 (id 'q1'): --max-new-tokens: the prompt (")
    assert len(err.strip().splitlines()) == 1 and not out.exists()


GOOD = {"id": "a", "image": "red.png", "question": "q?", "kind": "k"}


@pytest.mark.parametrize("lines, message", [
    (["{not json"], ":1: not valid JSON ("),
    ([json.dumps(["a", "b"])], ":1: expected a JSON object, got list"),
    ([{"image": "red.png", "question": "q?"}], ":1: no 'id' key"),
    ([{"id": "a", "question": "q?"}], ":1: no 'image' key"),
    ([{"id": 7, "image": "red.png", "question": "q?"}], ":1: 'id' must be a non-empty string, got 7"),
    ([{"id": "a", "image": "red.png"}], ":1 (id 'a'): 'question' must be a non-empty string, got None"),
    ([{**GOOD, "answer": "red"}], ":1: unknown keys ['answer']"),
    ([{"id": "a", "audio": "x.wav"}],
     ":1: a row with 'audio'; scripts.demo_vqa answers 'image' rows (use scripts.demo_asr)"),
    ([GOOD, "", {**GOOD, "id": "b"}, GOOD], ":4: duplicate id 'a' (first on line 1)"),
    ([GOOD, {**GOOD, "id": "b", "image": "gone/missing.png"}],
     ":2 (id 'b'): image file not found: 'gone/missing.png' (looked at "),
    ([""], ": no questions"),
])
def test_bad_questions_file_is_one_line_naming_file_and_line(assets, capsys, tmp_path, lines, message):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "red.png")
    questions = write_jsonl(tmp_path / "q.jsonl", lines)
    out = tmp_path / "predictions.jsonl"
    assert run_batch(assets["ckpt"], questions, out) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"error: {questions}{message}")
    assert not out.exists()


def test_missing_questions_file(assets, capsys, tmp_path):
    assert run_batch(assets["ckpt"], tmp_path / "nope.jsonl", tmp_path / "p.jsonl") == 2
    assert capsys.readouterr().err == f"error: questions file not found: {tmp_path / 'nope.jsonl'}\n"


@pytest.mark.parametrize("argv, message", [
    (["--questions", "q.jsonl", "--image", "x.png", "--out", "p.jsonl"],
     "argument --image: not allowed with argument --questions"),
    (["--questions", "q.jsonl", "--question", "why?", "--out", "p.jsonl"],
     "--question is per row in batch mode: not allowed with --questions"),
    (["--questions", "q.jsonl"], "--questions needs --out PREDICTIONS.jsonl"),
    (["--image", "x.png", "--question", "why?", "--out", "p.jsonl"], "--out goes with --questions"),
    (["--image", "x.png"], "--image needs --question"),
    (["--questions", "q.jsonl", "--out", "./q.jsonl"], "--out ./q.jsonl is the questions file"),
    (["--questions", "q.jsonl", "--out", "."], "--out . is a folder; name the predictions file"),
])
def test_batch_flag_misuse_exits_2(assets, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        demo_vqa.main([*argv, "--checkpoint", str(assets["ckpt"])])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip().splitlines()[-1].endswith(message)


@pytest.fixture(scope="module")
def speech_ckpt(tmp_path_factory):
    from speech.adapter import build_speech_llama
    from speech.model_io import save_speech_checkpoint
    from tests.speech.corpus import asr_corpus_text

    root = tmp_path_factory.mktemp("speech_export")
    tok = build_tiny_tokenizer(root, texts=asr_corpus_text())
    model = build_speech_llama(tiny_asr_config(tok))
    return save_speech_checkpoint(model, root / "ckpt", root / "tokenizer.model")


@pytest.mark.parametrize("batch", [False, True])
def test_a_speech_export_is_refused_naming_its_modality(speech_ckpt, held_out, capsys, tmp_path, batch):
    argv = (["--questions", str(held_out[0]), "--out", str(tmp_path / "p.jsonl")] if batch
            else ["--image", str(ASSET), "--question", "q?"])
    assert demo_vqa.main([*argv, "--checkpoint", str(speech_ckpt)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {speech_ckpt}: this demo answers with image/video models, and this export "
                   f"(format 'llama3-mm/speech/1') is a speech model: transcribe with scripts.demo_asr\n")


def test_long_files_show_progress_and_an_unwritable_out_is_named(assets, held_out, capsys, tmp_path,
                                                                  monkeypatch):
    from scripts import _batch

    monkeypatch.setattr(_batch, "PROGRESS_MIN_ROWS", 3)  # a 3-row file counts as long here
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert run_batch(assets["ckpt"], held_out[0], blocker / "predictions.jsonl") == 2
    err = capsys.readouterr().err
    assert "3/3" in err  # the progress bar ran to the end before the write failed
    assert err.splitlines()[-1].startswith(f"error: --out {blocker / 'predictions.jsonl'}: cannot write")


def test_our_exports_are_asked_with_trimmed_tiles_as_they_were_trained(assets, tmp_path):
    """The trainer feeds our models trimmed batches (a one-tile image is one tile); released Mllama weights
    saw padding tiles. Asking our export with padding slots would change what its encoder computes."""
    import torch

    from adapters.model_io import load_checkpoint
    from training.codecs import ImageCaptionCodec
    from vision.tiling import TilingConfig

    from PIL import Image

    model = load_checkpoint(assets["ckpt"], lm_path=assets["lm"]).eval()
    v = model.cfg.vision
    square = tmp_path / "square.png"  # one tile's size: one tile of max_tiles slots
    Image.open(ASSET).convert("RGB").resize((v.tile_size, v.tile_size)).save(square)
    ours, padded = demo_vqa.image_input(model, square, padded=False), demo_vqa.image_input(model, square, padded=True)
    assert padded.tiles.shape[2] == v.max_tiles > ours.tiles.shape[2] and bool(ours.tile_mask.all())
    codec = ImageCaptionCodec(None, TilingConfig(tile_size=v.tile_size, max_tiles=v.max_tiles))

    class Tiled:  # what the codec's decode puts in an Example: the tiled image
        def __init__(self, media):
            self.media = media

    from media.image import load_image
    from vision.tiling import tile_image

    trained = codec.collate_rows([[Tiled(tile_image(load_image(square), codec.tiling))]])["images"]
    assert torch.equal(ours.tiles, trained.tiles) and torch.equal(ours.tile_mask, trained.tile_mask)
