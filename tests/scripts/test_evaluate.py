"""scripts.evaluate: the demos' answers, batched, scored with common.vqa_metrics / common.metrics; bad task files
are one line naming file, line and id before any model loads."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from adapters.model_io import save_checkpoint
from common.metrics import cer, wer
from common.vqa_metrics import anls, mc_accuracy, relaxed_accuracy, vqa_accuracy
from scripts import demo_asr, demo_video, demo_vqa, evaluate
from tests.scripts.test_demo_vqa import read_jsonl, write_jsonl
from tests.tiny import build_tiny_tokenizer, build_tiny_vqa_model, tiny_asr_config, tiny_video_config

ASSET = Path(__file__).resolve().parents[2] / "assets" / "coffee.jpg"
METRIC_FNS = {"vqav2": lambda p, r: vqa_accuracy(p, r["answers"]),
              "textvqa": lambda p, r: vqa_accuracy(p, r["answers"], normalize_all=True),
              "docvqa": lambda p, r: anls(p, r["answers"]), "infovqa": lambda p, r: anls(p, r["answers"]),
              "chartqa": lambda p, r: relaxed_accuracy(p, r["answers"]),
              "video_mc": lambda p, r: mc_accuracy(p, r["options"], r["answers"][0])}


def open_gates(model) -> None:
    """Non-zero cross-attention gates: an untrained adapter is the identity, and the image would not matter."""
    with torch.no_grad():
        video = getattr(model, "video", None)
        for layers in (model.cross_attention_layers, *([video.cross_attention_layers] if video is not None else [])):
            for blk in layers:
                blk.gate_attn.fill_(0.7)
                blk.gate_ffwd.fill_(-0.7)


def run(ckpt, task, data, out, *extra):
    return evaluate.main(["--checkpoint", str(ckpt), "--task", task, "--data", str(data), "--out", str(out),
                          "--max-new-tokens", "4", *extra])


def demo_answers(demo, ckpt, rows, folder, *extra) -> dict[str, str]:
    """What the demo's batch mode answers for ``rows`` (each answered alone)."""
    questions = write_jsonl(folder / "demo_questions.jsonl", rows)
    out = folder / "demo_predictions.jsonl"
    assert demo.main(["--questions", str(questions), "--out", str(out), "--checkpoint", str(ckpt), *extra]) == 0
    return {p["id"]: p["answer"] for p in read_jsonl(out)}


# ---------------------------------------------------------------------------------------------- image tasks


@pytest.fixture(scope="module")
def image_task(tmp_path_factory):
    """A tiny export whose images matter, images of 1 and of several tiles, questions of two lengths, and the
    demo's answers; row "a" has 2 of 10 annotators giving the demo's answer, "b" has it once among 2."""
    from PIL import Image

    root = tmp_path_factory.mktemp("evaluate_image")
    tok = build_tiny_tokenizer(root)
    model = build_tiny_vqa_model(tok, seed=0)
    open_gates(model)
    ckpt = save_checkpoint(model, root / "ckpt", tokenizer_path=root / "tokenizer.model")
    folder = root / "task"
    (folder / "img").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(folder / "img" / "red.png")
    Image.new("RGB", (300, 70), (30, 30, 200)).save(folder / "img" / "wide.png")
    long_q, short_q = "What colour are the shapes?", "How many?"
    rows = [{"id": "a", "image": "img/red.png", "question": long_q},
            {"id": "b", "image": "img/wide.png", "question": long_q},
            {"id": "c", "image": str(ASSET), "question": short_q},
            {"id": "d", "image": "img/wide.png", "question": short_q},
            {"id": "e", "image": "img/red.png", "question": short_q}]
    answers = demo_answers(demo_vqa, ckpt, rows, folder, "--max-new-tokens", "4")
    assert len(set(answers.values())) > 1  # the images and questions change the answers
    for row in rows:
        row["answers"] = ["12", "12%", "Yes", "yes", "3"]
    rows[0]["answers"] = [answers["a"]] * 2 + ["other"] * 8
    rows[1]["answers"] = [answers["b"].upper() + ".", "no"]
    data = write_jsonl(folder / "task.jsonl", rows)
    return {"ckpt": ckpt, "data": data, "rows": rows, "answers": answers, "root": root}


@pytest.mark.parametrize("task, batch_size", [("vqav2", "3"), ("textvqa", "8"), ("docvqa", "1"),
                                               ("infovqa", "2"), ("chartqa", "5")])
def test_image_task_answers_as_the_demo_and_scores_with_the_benchmark_metric(image_task, capsys, tmp_path, task,
                                                                              batch_size):
    out = tmp_path / "out"
    assert run(image_task["ckpt"], task, image_task["data"], out, "--batch-size", batch_size) == 0
    captured = capsys.readouterr()
    preds = read_jsonl(out / "predictions.jsonl")
    assert [p["id"] for p in preds] == list("abcde")  # input order, whatever the batches were
    assert {p["id"]: p["answer"] for p in preds} == image_task["answers"]
    expected = [METRIC_FNS[task](p["answer"], row) for p, row in zip(preds, image_task["rows"])]
    assert read_jsonl(out / "scores.jsonl") == [{"id": p["id"], "score": s} for p, s in zip(preds, expected)]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == {"task": task, "metric": evaluate.TASKS[task].metric, "score": pytest.approx(sum(expected) / 5),
                       "n": 5, "checkpoint": str(image_task["ckpt"]), "data": str(image_task["data"])}
    assert f"{task}: {metrics['metric']} {metrics['score']:.4f} over 5 rows" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "predictions.jsonl", "scores.jsonl"]
    if task in ("vqav2", "textvqa"):
        # "a": 2 of 10 annotators gave the answer: (2 * 1/3 + 8 * 2/3) / 10. "b": the answer upper-cased with a
        # period, and "no": normalised, one match; leaving "no" out leaves 1 match (1/3), leaving it out none.
        assert expected[0] == pytest.approx(0.6) and expected[1] == pytest.approx((1 / 3 + 0) / 2)
    if task == "docvqa":  # ANLS ignores case; the period is one edit over the longer string
        n = len(" ".join(image_task["answers"]["b"].lower().split())) + 1
        assert expected[0] == 1.0 and expected[1] == pytest.approx(1 - 1 / n)


def test_a_row_that_cannot_be_answered_leaves_no_results(image_task, capsys, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows = [{**r, "image": str(image_task["data"].parent / r["image"])} for r in image_task["rows"][:2]]
    rows[1]["image"] = str(bad)
    data = write_jsonl(tmp_path / "task.jsonl", rows)
    out = tmp_path / "out"
    out.mkdir()
    for name in ("metrics.json", "scores.jsonl"):
        (out / name).write_text("an earlier run's\n")
    assert run(image_task["ckpt"], "docvqa", data, out) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {data}:2 (id 'b'): ") and "broken.png" in err and len(err.splitlines()) == 1
    assert list(out.iterdir()) == []  # no predictions, and the earlier scores and metrics are gone


def test_an_answer_that_cannot_fit_names_the_row_before_decoding(image_task, capsys, tmp_path):
    from adapters.model_io import load_checkpoint

    limit = load_checkpoint(image_task["ckpt"]).cfg.lm.max_seq_len
    assert run(image_task["ckpt"], "vqav2", image_task["data"], tmp_path / "out", "--max-new-tokens", str(limit)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {image_task['data']}:1 (id 'a'): --max-new-tokens: the prompt (")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- video


def test_video_mc_asks_with_lettered_options_and_scores_the_choice(tmp_path, capsys):
    from adapters.llama import build_llama
    from adapters.multimodal import build_multimodal
    from synthetic.motion import QUESTION, make_motion_clips, motion_corpus_text

    tok = build_tiny_tokenizer(tmp_path, texts=motion_corpus_text())
    cfg = tiny_video_config(tok, 8)
    torch.manual_seed(0)
    model = build_multimodal(cfg, build_llama(cfg.lm))
    open_gates(model)
    ckpt = save_checkpoint(model, tmp_path / "ckpt", tokenizer_path=tmp_path / "tokenizer.model")
    clips = make_motion_clips(3, seed=0, max_frames=9)
    for i, clip in enumerate(clips):
        (tmp_path / f"clip{i}.mp4").write_bytes(clip.video)
    options = ["left", "right", "up", "down"]
    rows = [{"id": f"v{i}", "video": f"clip{i}.mp4", "question": QUESTION, "options": options,
             "answers": [clip.direction if i % 2 else "ABCD"[options.index(clip.direction)]]}
            for i, clip in enumerate(clips)]
    data = write_jsonl(tmp_path / "task.jsonl", rows)
    asked = [{"id": r["id"], "video": r["video"], "question": evaluate.mc_prompt(QUESTION, tuple(options))}
             for r in rows]
    assert asked[0]["question"] == ("Which way does the ball move?\nA. left\nB. right\nC. up\nD. down\n"
                                    "Answer with the option's letter from the given choices directly.")
    answers = demo_answers(demo_video, ckpt, asked, tmp_path, "--max-new-tokens", "4", "--frames", "8")
    out = tmp_path / "out"
    assert run(ckpt, "video_mc", data, out, "--batch-size", "2") == 0  # --frames: the checkpoint's 8
    preds = read_jsonl(out / "predictions.jsonl")
    assert {p["id"]: p["answer"] for p in preds} == answers
    expected = [METRIC_FNS["video_mc"](p["answer"], r) for p, r in zip(preds, rows)]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metric"] == "mc_accuracy" and metrics["score"] == pytest.approx(sum(expected) / 3)
    assert [s["score"] for s in read_jsonl(out / "scores.jsonl")] == expected


# ---------------------------------------------------------------------------------------------- asr


@pytest.fixture(scope="module")
def speech_ckpt(tmp_path_factory):
    from speech.adapter import build_speech_llama
    from speech.model_io import save_speech_checkpoint
    from tests.speech.corpus import asr_corpus_text

    root = tmp_path_factory.mktemp("evaluate_speech")
    tok = build_tiny_tokenizer(root, texts=asr_corpus_text())
    torch.manual_seed(0)
    return save_speech_checkpoint(build_speech_llama(tiny_asr_config(tok)), root / "ckpt", root / "tokenizer.model")


def test_asr_transcribes_as_the_demo_and_scores_corpus_wer(speech_ckpt, capsys, tmp_path):
    t = np.arange(16_000 * 3) / 16_000
    sf.write(tmp_path / "long.wav", 0.3 * np.sin(2 * np.pi * 440 * t), 16_000)
    sf.write(tmp_path / "short.flac", 0.2 * np.sin(2 * np.pi * 220 * t[:12_000]), 16_000)
    sf.write(tmp_path / "mid.wav", 0.2 * np.sin(2 * np.pi * 330 * t[:20_000]), 16_000)
    audio = {"u1": "long.wav", "u2": "short.flac", "u3": "mid.wav"}
    refs = {"u1": "one two three", "u2": "Four, five!", "u3": "six"}
    data = write_jsonl(tmp_path / "task.jsonl", [{"id": k, "audio": audio[k], "answers": [refs[k]]} for k in audio])
    answers = demo_answers(demo_asr, speech_ckpt, [{"id": k, "audio": audio[k]} for k in audio], tmp_path,
                           "--max-new-tokens", "3")
    out = tmp_path / "out"
    assert run(speech_ckpt, "asr", data, out, "--max-new-tokens", "3", "--batch-size", "2") == 0
    preds = read_jsonl(out / "predictions.jsonl")
    assert [p["id"] for p in preds] == ["u1", "u2", "u3"] and {p["id"]: p["answer"] for p in preds} == answers
    hyps = [p["answer"] for p in preds]
    words, chars = wer(list(refs.values()), hyps), cer(list(refs.values()), hyps)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metric"] == "wer" and metrics["score"] == words.rate and metrics["n"] == 3
    assert metrics["wer"] == words.to_dict() and metrics["cer"] == chars.to_dict()
    scores = read_jsonl(out / "scores.jsonl")
    assert [s["word_errors"] for s in scores] == [u.errors for u in words.utterances]
    assert [s["n_ref_words"] for s in scores] == [3, 2, 1]
    assert [s["score"] for s in scores] == [u.errors / u.n_ref for u in words.utterances]


# ---------------------------------------------------------------------------------------------- bad input


@pytest.fixture()
def media(tmp_path):
    for name in ("red.png", "clip.mp4", "a.wav"):
        (tmp_path / name).write_bytes(b"never decoded: the checks fail first")
    return tmp_path


TEN = ["red"] * 10
IMG = {"id": "a", "image": "red.png", "question": "q?", "answers": TEN}
VID = {"id": "v", "video": "clip.mp4", "question": "q?", "options": ["left", "right"], "answers": ["A"]}
AUD = {"id": "s", "audio": "a.wav", "answers": ["hello"]}


@pytest.mark.parametrize("task, lines, message", [
    ("vqav2", [IMG, {"id": "b", "image": "red.png", "question": "q?"}],
     ":2 (id 'b'): no 'answers': every row of a task file needs its ground-truth answers"),
    ("docvqa", [{**{k: v for k, v in IMG.items() if k != "answers"}, "answer": "red"}],
     ":1 (id 'a'): no 'answers': every row of a task file needs its ground-truth answers (found 'answer': "),
    ("vqav2", [{**IMG, "answers": ["red"]}], ":1 (id 'a'): VQA accuracy needs at least 2 reference answers, got 1"),
    ("chartqa", [{**IMG, "answers": "red"}], ":1 (id 'a'): 'answers' must be a non-empty list of strings, got 'red'"),
    ("chartqa", [{**IMG, "answers": []}], ":1 (id 'a'): 'answers' must be a non-empty list of strings, got []"),
    ("docvqa", [{**IMG, "answers": ["x", 3]}], ":1 (id 'a'): 'answers' must be a non-empty list of strings"),
    ("vqav2", [{**IMG, "kind": "colour"}],
     ":1 (id 'a'): unknown keys ['kind'] for --task vqav2 (expected id, image, question, answers)"),
    ("vqav2", [{**IMG, "question": " "}], ":1 (id 'a'): 'question' must be a non-empty string, got ' '"),
    ("vqav2", [{**IMG, "id": ""}], ":1: 'id' must be a non-empty string or an integer, got ''"),
    ("vqav2", [IMG, "", {**IMG, "id": "b"}, IMG], ":4: duplicate id 'a' (first on line 1)"),
    ("vqav2", [{**IMG, "id": 7}, {**IMG, "id": "7"}], ":2: duplicate id '7' (first on line 1)"),
    ("vqav2", [{**IMG, "image": "gone.png"}], ":1 (id 'a'): image file not found: 'gone.png' (looked at "),
    ("vqav2", [AUD], ":1: a row with 'audio'; --task vqav2 takes 'image' rows ('audio' rows are for --task asr)"),
    ("video_mc", [{**VID, "answers": ["C"]}], ":1 (id 'v'): the answer 'C' names none of the options"),
    ("video_mc", [{k: v for k, v in VID.items() if k != "options"}], ":1 (id 'v'): no 'options' key"),
    ("video_mc", [{**VID, "options": ["left", "Left"]}], ":1 (id 'v'): two options read the same"),
    ("asr", [{**AUD, "question": "what?"}], ":1 (id 's'): speech rows carry no question"),
    ("asr", [{**AUD, "answers": ["a", "b"]}],
     ":1 (id 's'): an asr row's 'answers' holds its one reference transcript, got 2"),
    ("asr", [{**AUD, "answers": ["..."]}], ": the reference transcripts hold no words (after normalisation)"),
    ("vqav2", ["{not json"], ":1: not valid JSON ("),
    ("vqav2", [""], ": no rows"),
])
def test_a_bad_task_file_is_one_line_before_any_model_loads(media, capsys, monkeypatch, task, lines, message):
    monkeypatch.setattr(evaluate, "load_model", lambda *a: pytest.fail("the model loaded before the checks"))
    data = write_jsonl(media / "task.jsonl", lines)
    assert run(media / "no_checkpoint", task, data, media / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {data}{message}") and len(err.splitlines()) == 1
    assert not (media / "out").exists()


def test_parquet_rows_read_as_jsonl_rows_and_nulls_are_missing(media, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{**IMG, "id": "a"}, {**IMG, "id": "b", "image": str(media / "red.png")}]
    jsonl = evaluate.read_items(write_jsonl(media / "task.jsonl", rows), "vqav2")
    pq.write_table(pa.Table.from_pylist(rows), media / "task.parquet")
    from_parquet = evaluate.read_items(media / "task.parquet", "vqav2")
    assert [(i.row.id, i.row.media, i.row.question, i.answers) for i in from_parquet] == \
           [(i.row.id, i.row.media, i.row.question, i.answers) for i in jsonl]
    assert from_parquet[0].row.where == f"{media / 'task.parquet'}:1 (id 'a')"
    pq.write_table(pa.Table.from_pylist([IMG, {**IMG, "id": "b", "answers": None}]), media / "null.parquet")
    assert run(media / "no_checkpoint", "vqav2", media / "null.parquet", media / "out") == 2
    assert capsys.readouterr().err.startswith(f"error: {media / 'null.parquet'}:2 (id 'b'): no 'answers'")
    (media / "junk.parquet").write_text("not parquet")
    assert run(media / "no_checkpoint", "vqav2", media / "junk.parquet", media / "out") == 2
    assert capsys.readouterr().err.startswith(f"error: {media / 'junk.parquet'}: not a readable parquet file")


def test_another_modalitys_export_is_refused_naming_what_it_is(image_task, speech_ckpt, capsys, tmp_path):
    write_jsonl(tmp_path / "img.jsonl", [{**IMG, "image": str(ASSET)}])
    assert run(speech_ckpt, "vqav2", tmp_path / "img.jsonl", tmp_path / "out") == 2
    assert capsys.readouterr().err == (
        f"error: {speech_ckpt}: --task vqav2 needs an image/video model, and this export (format "
        f"'llama3-mm/speech/1') is a speech model: transcribe with scripts.demo_asr\n")
    sf.write(tmp_path / "a.wav", np.zeros(1600), 16_000)
    write_jsonl(tmp_path / "asr.jsonl", [AUD])
    assert run(image_task["ckpt"], "asr", tmp_path / "asr.jsonl", tmp_path / "out") == 2
    assert capsys.readouterr().err.startswith(f"error: {image_task['ckpt']}: --task asr needs a speech model, and "
                                              f"this export (format 'llama3-mm/multimodal/1') is an image/video")


def test_an_image_export_without_video_is_refused_for_video_mc(image_task, media, capsys):
    write_jsonl(media / "task.jsonl", [VID])
    assert run(image_task["ckpt"], "video_mc", media / "task.jsonl", media / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {image_task['ckpt']}: the checkpoint has no video adapter")


@pytest.mark.parametrize("extra, message", [
    (["--task", "asr", "--lm", "x"], "--lm goes with image/video exports (a speech export holds its LM)"),
    (["--task", "vqav2", "--frames", "4"], "--frames goes with --task video_mc"),
    (["--task", "vqav2", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["--task", "mmmu"], "argument --task: invalid choice: 'mmmu'"),
])
def test_flag_misuse_exits_2(capsys, tmp_path, extra, message):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", "c", "--data", "d.jsonl", "--out", str(tmp_path), *extra])
    assert e.value.code == 2 and message in capsys.readouterr().err.strip().splitlines()[-1]


def test_out_must_be_a_folder(capsys, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--checkpoint", "c", "--task", "vqav2", "--data", "d", "--out", str(tmp_path / "file")])
    assert e.value.code == 2 and "is a file; name a folder" in capsys.readouterr().err


def test_shards_are_a_task_file_too(tmp_path):
    """--data SHARDS: the shard builders' qa samples (key.json meta question / answer(s) + key.jpg) read as rows,
    the images extracted under DIR/shard_media; a sample without answers is named by shard and key."""
    import io

    import webdataset as wds
    from PIL import Image

    def jpg(color):
        buf = io.BytesIO()
        Image.new("RGB", (32, 24), color).save(buf, format="JPEG")
        return buf.getvalue()

    shard = tmp_path / "qa_00000.tar"
    with wds.TarWriter(str(shard)) as w:
        w.write({"__key__": "a", "jpg": jpg("red"), "json": {"meta": {"question": "Colour?", "answer": "red"}}})
        meta = {"question": "Colour?", "answers": ["blue"] * 3}
        w.write({"__key__": "b", "png": jpg("blue"), "json": {"meta": meta}})
    items = evaluate.read_items(str(tmp_path / "qa_*.tar"), "docvqa", tmp_path / "out" / "shard_media")
    assert [(i.row.id, i.row.question, i.answers) for i in items] == [("a", "Colour?", ("red",)),
                                                                      ("b", "Colour?", ("blue",) * 3)]
    assert items[0].row.media.read_bytes() == jpg("red") and items[0].row.media.parent.name == "qa_00000"
    with wds.TarWriter(str(tmp_path / "bad_00000.tar")) as w:
        w.write({"__key__": "c", "jpg": jpg("red"), "json": {"meta": {"question": "Colour?"}}})
    with pytest.raises(evaluate.BatchInputError, match=r"bad_00000.tar:1 \(id 'c'\): no 'answers'"):
        evaluate.read_items(str(tmp_path / "bad_00000.tar"), "docvqa", tmp_path / "m")
    with pytest.raises(evaluate.BatchInputError, match=r"nothing.tar"):
        evaluate.read_items(str(tmp_path / "nothing.tar"), "docvqa", tmp_path / "m")
