"""demo_vqa: bad arguments are one error line and exit status 2; --lm finds an export's LM elsewhere."""

import json
import shutil
from pathlib import Path

import pytest

from adapters.checkpoint import save_meta_checkpoint
from adapters.model_io import save_checkpoint
from adapters.vqa import build_tiny_tokenizer, build_tiny_vqa_model
from scripts import demo_vqa

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
