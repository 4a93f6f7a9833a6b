import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from adapters.llama import build_llama
from adapters.model_io import save_checkpoint
from adapters.multimodal import build_multimodal
from scripts import demo_video
from synthetic.motion import QUESTION, make_motion_clips, motion_corpus_text
from tests.tiny import build_tiny_tokenizer, tiny_asr_config, tiny_video_config

MAX_FRAMES = 12


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny untrained video model's checkpoint, its image-only twin's, and a 9-frame clip."""
    root = tmp_path_factory.mktemp("demo_video")
    tok = build_tiny_tokenizer(root, texts=motion_corpus_text())
    cfg = tiny_video_config(tok, MAX_FRAMES)
    torch.manual_seed(0)
    lm = build_llama(cfg.lm)
    tok_path = root / "tokenizer.model"
    video_ckpt = save_checkpoint(build_multimodal(cfg, lm), root / "video", tokenizer_path=tok_path)
    image_model = build_multimodal(replace(cfg, video=None), lm)
    image_ckpt = save_checkpoint(image_model, root / "image", tokenizer_path=tok_path)
    clip = root / "clip.mp4"
    clip.write_bytes(make_motion_clips(1, seed=0, max_frames=9)[0].video)
    return {"video": video_ckpt, "image": image_ckpt, "clip": clip, "root": root}


def run(assets, *extra, video=None, ckpt="video"):
    return demo_video.main(["--video", str(video or assets["clip"]), "--question", QUESTION,
                            "--checkpoint", str(assets[ckpt]), "--max-new-tokens", "4", *extra])


def test_demo_streams_an_answer_and_reports_the_frames(assets, capsys):
    assert run(assets, "--frames", str(MAX_FRAMES), "--backend", "pyav") == 0
    out, err = capsys.readouterr()
    # 12 frames from a 9-frame clip: 3 of them repeat an earlier frame.
    assert f"clip.mp4: read {MAX_FRAMES} frames with pyav, 3 of them repeats (the video has 9 frames" in err
    assert out.strip() and out.endswith("\n")


def test_corrupt_video_is_a_named_error(assets, capsys):
    bad = assets["root"] / "broken.mp4"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    assert run(assets, "--frames", "4", "--timeout", "0", video=bad) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "broken.mp4" in err


@pytest.mark.parametrize("frames", [0, MAX_FRAMES + 1])
def test_frames_outside_the_checkpoints_range(assets, capsys, frames):
    assert run(assets, "--frames", str(frames)) == 2
    assert f"--frames must be in [1, {MAX_FRAMES}]" in capsys.readouterr().err


def test_image_only_checkpoint_is_refused(assets, capsys):
    assert run(assets, "--frames", "4", ckpt="image") == 2
    err = capsys.readouterr().err
    assert "no video adapter" in err and str(assets["image"]) in err


def test_a_jpeg_is_refused_as_a_still_image(assets, capsys):
    from pathlib import Path

    jpeg = Path(__file__).resolve().parents[2] / "assets" / "coffee.jpg"
    assert run(assets, "--frames", "4", video=jpeg) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {jpeg}: a still image (JPEG), not a video") and "demo_vqa" in err


def test_bad_sampling_argument_exits_2(assets, capsys):
    with pytest.raises(SystemExit) as e:
        run(assets, "--top-p", "2")
    assert e.value.code == 2 and "argument --top-p: must be in (0, 1], got 2" in capsys.readouterr().err


def test_more_new_tokens_than_the_context_holds(assets, capsys):
    assert run(assets, "--frames", "4", "--backend", "pyav", "--max-new-tokens", "100000") == 2
    assert "error: --max-new-tokens: the prompt (" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- batch mode


def write_questions(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_batch(assets, questions, out, *extra, ckpt="video"):
    return demo_video.main(["--questions", str(questions), "--out", str(out), "--checkpoint", str(assets[ckpt]),
                            "--max-new-tokens", "4", "--frames", "6", "--backend", "pyav", *extra])


def test_batch_answers_equal_single_answers(assets, capsys, tmp_path):
    folder = tmp_path / "held_out"
    (folder / "clips").mkdir(parents=True)
    (folder / "clips" / "b.mp4").write_bytes(make_motion_clips(2, seed=3, max_frames=11)[1].video)
    rows = [{"id": "b", "video": "clips/b.mp4", "question": QUESTION, "kind": "direction"},
            {"id": "a", "video": str(assets["clip"]), "question": QUESTION, "kind": "direction"}]
    questions = write_questions(folder / "questions.jsonl", rows)
    out = tmp_path / "predictions.jsonl"
    assert run_batch(assets, questions, out) == 0
    err = capsys.readouterr().err
    assert "demo_video: answered 2 rows" in err and "frames with pyav" not in err  # a summary, not per row
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["id"] for p in preds] == ["b", "a"] and all(p["answer"].strip() for p in preds)
    for video, pred in zip([folder / "clips" / "b.mp4", assets["clip"]], preds):
        assert run(assets, "--frames", "6", "--backend", "pyav", video=video) == 0
        assert capsys.readouterr().out == pred["answer"] + "\n"


def test_batch_still_image_row_is_named(assets, capsys, tmp_path):
    from pathlib import Path

    jpeg = Path(__file__).resolve().parents[2] / "assets" / "coffee.jpg"
    rows = [{"id": "ok", "video": str(assets["clip"]), "question": QUESTION},
            {"id": "still", "video": str(jpeg), "question": QUESTION}]
    questions = write_questions(tmp_path / "q.jsonl", rows)
    out = tmp_path / "predictions.jsonl"
    assert run_batch(assets, questions, out) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {questions}:2 (id 'still'): {jpeg}: a still image (JPEG), not a video; ask about "
                   f"images with scripts.demo_vqa --image\n")
    assert not out.exists()


def test_batch_missing_video_and_image_rows_are_named(assets, capsys, tmp_path):
    questions = write_questions(tmp_path / "q.jsonl", [{"id": "v1", "video": "nowhere.mp4", "question": "q"}])
    assert run_batch(assets, questions, tmp_path / "p.jsonl") == 2
    assert capsys.readouterr().err == (f"error: {questions}:1 (id 'v1'): video file not found: 'nowhere.mp4' "
                                       f"(looked at {tmp_path / 'nowhere.mp4'})\n")
    questions = write_questions(tmp_path / "q.jsonl", [{"id": "v1", "image": "x.png", "question": "q"}])
    assert run_batch(assets, questions, tmp_path / "p.jsonl") == 2
    assert "a row with 'image'; scripts.demo_video answers 'video' rows (use scripts.demo_vqa)" in \
        capsys.readouterr().err


def test_batch_with_an_image_only_checkpoint_is_refused(assets, capsys, tmp_path):
    questions = write_questions(tmp_path / "q.jsonl", [{"id": "a", "video": str(assets["clip"]), "question": "q"}])
    assert run_batch(assets, questions, tmp_path / "p.jsonl", ckpt="image") == 2
    err = capsys.readouterr().err
    assert "no video adapter" in err and not (tmp_path / "p.jsonl").exists()


def test_video_and_questions_are_mutually_exclusive(assets, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        demo_video.main(["--questions", "q.jsonl", "--video", str(assets["clip"]), "--out", "p.jsonl",
                         "--checkpoint", str(assets["video"])])
    assert e.value.code == 2
    assert "argument --video: not allowed with argument --questions" in capsys.readouterr().err


def test_a_speech_export_is_refused_naming_its_modality(assets, capsys, tmp_path):
    from speech.adapter import build_speech_llama
    from speech.model_io import save_speech_checkpoint
    from tests.speech.corpus import asr_corpus_text

    tok = build_tiny_tokenizer(tmp_path, texts=asr_corpus_text())
    ckpt = save_speech_checkpoint(build_speech_llama(tiny_asr_config(tok)), tmp_path / "speech",
                                  tmp_path / "tokenizer.model")
    assert demo_video.main(["--video", str(assets["clip"]), "--question", "q", "--checkpoint", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {ckpt}: this demo answers with image/video models") and "demo_asr" in err
