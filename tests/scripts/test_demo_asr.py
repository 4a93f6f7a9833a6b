import json
from dataclasses import replace

import numpy as np
import pytest
import soundfile as sf
import torch

from scripts import demo_asr
from speech.model_io import save_speech_checkpoint
from tests.speech.corpus import asr_corpus_text
from tests.tiny import build_tiny_tokenizer, build_tiny_vqa_model, tiny_asr_config
from speech.adapter import build_speech_llama


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """An untrained tiny speech model's checkpoint and a 2.5 s stereo 44.1 kHz tone."""
    root = tmp_path_factory.mktemp("demo_asr")
    tok = build_tiny_tokenizer(root, texts=asr_corpus_text())
    torch.manual_seed(0)
    ckpt = save_speech_checkpoint(build_speech_llama(tiny_asr_config(tok)), root / "ckpt", root / "tokenizer.model")
    t = np.arange(int(2.5 * 44_100)) / 44_100
    tone = 0.3 * np.sin(2 * np.pi * 440 * t)
    wav = root / "tone.wav"
    sf.write(wav, np.stack([tone, tone], 1), 44_100)
    return {"ckpt": ckpt, "wav": wav, "root": root}


def run(assets, *extra, audio=None, ckpt=None):
    return demo_asr.main(["--audio", str(audio or assets["wav"]), "--checkpoint", str(ckpt or assets["ckpt"]),
                          "--max-new-tokens", "3", *extra])


@pytest.mark.parametrize("task", ["asr", "ast"])
def test_streams_a_transcript_and_describes_the_audio(assets, capsys, task):
    assert run(assets, "--task", task) == 0
    out, err = capsys.readouterr()
    assert "tone.wav: 2.50 s, read at 44100 Hz x 2 channel(s)" in err and "pieces" not in err
    assert out.endswith("\n") and out.strip()


def test_long_audio_is_decoded_in_pieces(assets, capsys):
    assert run(assets, "--chunk-seconds", "1") == 0
    out, err = capsys.readouterr()
    assert "3 pieces" in err
    assert len(out.split()) >= 3  # one transcript per piece, joined by spaces


def test_same_text_as_the_batch_decoder(assets, capsys):
    """The streamed greedy transcript equals the collected decoding loop's on the same clip."""
    from adapters.tokenizer import Tokenizer
    from adapters.generation import SamplingConfig, collect_ids
    from speech.adapter import asr_prompt, encode_speech_dialog, speech_decode
    from speech.model_io import load_speech_checkpoint
    from media.audio import load_audio

    assert run(assets) == 0
    out = capsys.readouterr().out
    model = load_speech_checkpoint(assets["ckpt"])
    tok = Tokenizer(assets["ckpt"] / "tokenizer.model")
    x = torch.from_numpy(load_audio(assets["wav"]).samples)[None]
    ids = collect_ids(speech_decode(model, torch.tensor([encode_speech_dialog(tok, asr_prompt())]), x,
                                    torch.tensor([x.shape[1]]), SamplingConfig(max_new_tokens=3), tok.stop_ids),
                      tok.stop_ids)[0]
    assert out == tok.decode(ids) + "\n"


def test_corrupt_audio_is_a_named_error(assets, capsys):
    bad = assets["root"] / "broken.flac"
    bad.write_bytes(np.random.default_rng(0).bytes(2048))
    assert run(assets, audio=bad) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "broken.flac" in err


def test_missing_checkpoint_is_a_named_error(assets, capsys):
    missing = assets["root"] / "nowhere"
    assert run(assets, ckpt=missing) == 2
    assert "nowhere" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--chunk-seconds", "0", "argument --chunk-seconds: must be at least one sample (1/16000 s), got 0"),
    ("--chunk-seconds", "0.00005",
     "argument --chunk-seconds: must be at least one sample (1/16000 s), got 0.00005"),
    ("--max-new-tokens", "-5", "argument --max-new-tokens: must be >= 1, got -5"),
])
def test_bad_arguments_exit_2_with_one_line(assets, capsys, flag, value, message):
    with pytest.raises(SystemExit) as e:
        run(assets, flag, value)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip().splitlines()[-1].endswith(message) and "Traceback" not in err


@pytest.fixture(scope="module")
def short_context(assets):
    """The tiny model with a context of the prompt + 3 new tokens + 15 audio positions (about 1.2 s):
    a 2.5 s clip under the default 60 s chunk must still be split to fit."""
    from adapters.tokenizer import Tokenizer
    from speech.adapter import asr_prompt, encode_speech_dialog
    from speech.model_io import load_speech_checkpoint

    tok = Tokenizer(assets["ckpt"] / "tokenizer.model")
    prompt_len = len(encode_speech_dialog(tok, asr_prompt()))
    model = load_speech_checkpoint(assets["ckpt"])
    model.cfg = replace(model.cfg, max_seq_len=prompt_len - 1 + 3 + 15)
    ckpt = save_speech_checkpoint(model, assets["root"] / "short", assets["ckpt"] / "tokenizer.model")
    return ckpt, prompt_len


def test_pieces_are_cut_to_what_the_checkpoint_holds(assets, short_context, capsys):
    from speech.model_io import load_speech_checkpoint

    ckpt, prompt_len = short_context
    cfg = load_speech_checkpoint(ckpt).cfg
    n = demo_asr.max_piece_samples(cfg, prompt_len, 3, 60 * 16_000)
    assert demo_asr.audio_positions(cfg, n) <= 15 < demo_asr.audio_positions(cfg, n + 1)
    assert run(assets, ckpt=ckpt) == 0  # the spliced rows fit: SpeechLlama refuses any longer one
    out, err = capsys.readouterr()
    assert f"3 pieces of at most {n / 16_000:.2f} s" in err
    assert len(out.split()) >= 3  # one transcript per piece, joined by spaces


def test_no_room_for_audio_is_one_error_line(assets, short_context, capsys):
    assert run(assets, "--max-new-tokens", "20", ckpt=short_context[0]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert "--max-new-tokens 20 leaves no room for audio" in err


# ---------------------------------------------------------------------------------------------- batch mode


def write_questions(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_batch(assets, questions, out, *extra, ckpt=None):
    return demo_asr.main(["--questions", str(questions), "--out", str(out), "--checkpoint",
                          str(ckpt or assets["ckpt"]), "--max-new-tokens", "3", *extra])


@pytest.mark.parametrize("extra", [(), ("--chunk-seconds", "1", "--task", "ast", "--language", "French")])
def test_batch_transcripts_equal_single_transcripts(assets, capsys, tmp_path, extra):
    folder = tmp_path / "held_out"
    (folder / "audio").mkdir(parents=True)
    t = np.arange(16_000 * 2) / 16_000
    sf.write(folder / "audio" / "low.flac", 0.2 * np.sin(2 * np.pi * 220 * t), 16_000)
    rows = [{"id": "low", "audio": "audio/low.flac", "kind": "transcript"},
            {"id": "tone", "audio": str(assets["wav"]), "kind": "transcript"}]
    questions = write_questions(folder / "questions.jsonl", rows)
    out = tmp_path / "predictions.jsonl"
    assert run_batch(assets, questions, out, *extra) == 0
    err = capsys.readouterr().err
    assert "demo_asr: answered 2 rows" in err and "channel(s)" not in err  # a summary, not per file
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["id"] for p in preds] == ["low", "tone"] and all(p["answer"].strip() for p in preds)
    for audio, pred in zip([folder / "audio" / "low.flac", assets["wav"]], preds):
        assert run(assets, *extra, audio=audio) == 0
        assert capsys.readouterr().out == pred["answer"] + "\n"
    if extra:  # pieces of 1 s: one transcript per piece, joined by spaces in the answer too
        assert len(preds[1]["answer"].split()) >= 3


def test_speech_rows_with_a_question_are_refused(assets, capsys, tmp_path):
    questions = write_questions(tmp_path / "q.jsonl", [{"id": "a", "audio": str(assets["wav"]),
                                                        "question": "Which digit?"}])
    assert run_batch(assets, questions, tmp_path / "p.jsonl") == 2
    assert capsys.readouterr().err == (f"error: {questions}:1 (id 'a'): speech rows carry no question (the task "
                                       f"is --task asr/ast), got 'Which digit?'\n")


def test_batch_corrupt_and_missing_audio_are_named(assets, capsys, tmp_path):
    bad = tmp_path / "broken.flac"
    bad.write_bytes(np.random.default_rng(0).bytes(2048))
    questions = write_questions(tmp_path / "q.jsonl", [{"id": "ok", "audio": str(assets["wav"])},
                                                       {"id": "bad", "audio": "broken.flac"}])
    out = tmp_path / "p.jsonl"
    assert run_batch(assets, questions, out) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {questions}:2 (id 'bad'): ") and "broken.flac" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    questions = write_questions(tmp_path / "q.jsonl", [{"id": "gone", "audio": "nowhere.wav"}])
    assert run_batch(assets, questions, out) == 2
    assert "(id 'gone'): audio file not found: 'nowhere.wav'" in capsys.readouterr().err


def test_audio_and_questions_are_mutually_exclusive(assets, capsys):
    with pytest.raises(SystemExit) as e:
        demo_asr.main(["--questions", "q.jsonl", "--audio", str(assets["wav"]), "--out", "p.jsonl",
                       "--checkpoint", str(assets["ckpt"])])
    assert e.value.code == 2
    assert "argument --audio: not allowed with argument --questions" in capsys.readouterr().err


@pytest.mark.parametrize("batch", [False, True])
def test_an_image_export_is_refused_naming_its_modality(assets, capsys, tmp_path, batch):
    from adapters.model_io import save_checkpoint

    tok = build_tiny_tokenizer(tmp_path)
    ckpt = save_checkpoint(build_tiny_vqa_model(tok), tmp_path / "vqa", tokenizer_path=tmp_path / "tokenizer.model")
    if batch:
        questions = write_questions(tmp_path / "q.jsonl", [{"id": "a", "audio": str(assets["wav"])}])
        assert run_batch(assets, questions, tmp_path / "p.jsonl", ckpt=ckpt) == 2
    else:
        assert run(assets, ckpt=ckpt) == 2
    assert capsys.readouterr().err == (f"error: {ckpt}: this demo answers with speech models, and this export "
                                       f"(format 'llama3-mm/multimodal/1') is an image/video model: ask with "
                                       f"scripts.demo_vqa or scripts.demo_video\n")


def test_a_speech_encoder_run_is_refused_naming_what_it_is(assets, capsys, tmp_path):
    from speech.bestrq import BestRQConfig
    from speech.conformer import conformer_config
    from speech.features import LogMelConfig
    from speech.pretrain import build_bestrq, save_pretrained

    model = build_bestrq(conformer_config("tiny"), BestRQConfig(n_codebooks=2, codebook_size=64), LogMelConfig())
    run_dir = save_pretrained(model, LogMelConfig(), tmp_path / "encoder")
    assert run(assets, ckpt=run_dir) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run_dir}: this demo answers with speech models, and this export (format "
                          f"'llama3-mm/speech-encoder/1') is a pre-trained speech encoder without an LM")
