"""The CLI entry points run end to end on tiny models and fail clearly on bad input."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from adapters.model_io import load_checkpoint, save_checkpoint
from scripts import demo_vqa, inspect_image
from tests.tiny import build_tiny_tokenizer, build_tiny_vqa_model

ASSET = Path(__file__).resolve().parents[2] / "assets" / "coffee.jpg"


def test_inspect_image_reports_layout_and_writes_png(tmp_path, capsys):
    out = tmp_path / "tiles.png"
    assert inspect_image.main([str(ASSET), "--preset", "tiny", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["layout_rows_cols"] == [2, 2] and summary["real_tiles"] == 4
    assert summary["shapes"]["encoder out (B, tiles, N, width*(1+taps))"] == [1, 4, 17, 384]
    assert Image.open(out).size[0] > 2 * 56


def test_inspect_image_bad_file(tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    assert inspect_image.main([str(bad)]) == 2
    assert "broken.jpg" in capsys.readouterr().err


def test_checkpoint_round_trip_and_demo_streams_an_answer(tmp_path, capsys):
    tok = build_tiny_tokenizer(tmp_path)
    model = build_tiny_vqa_model(tok, seed=0)
    with torch.no_grad():
        for blk in model.cross_attention_layers:
            blk.gate_attn.fill_(0.3)
    ckpt = save_checkpoint(model, tmp_path / "ckpt", tokenizer_path=tmp_path / "tokenizer.model")
    loaded = load_checkpoint(ckpt)
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert not any(p.requires_grad for p in loaded.lm.parameters())
    code = demo_vqa.main(["--image", str(ASSET), "--question", "What colour are the shapes?",
                          "--checkpoint", str(ckpt), "--max-new-tokens", "4"])
    assert code == 0 and capsys.readouterr().out.endswith("\n")
    assert demo_vqa.main(["--image", str(tmp_path / "nope.png"), "--question", "q", "--checkpoint", str(ckpt)]) == 2
    assert "nope.png" in capsys.readouterr().err


def test_bad_checkpoint_directories_raise_named_errors(tmp_path):
    from adapters.checkpoint import CheckpointError
    import pytest

    with pytest.raises(CheckpointError, match="config.json: not found"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "llama3-mm/multimodal/1", "config": {"lm": {}}}))
    with pytest.raises(CheckpointError, match="'vision' section"):
        load_checkpoint(tmp_path)


# Modules run as ``python -m scripts.<name>`` (scripts/learning_*.py are the roads bench_learning runs, no CLI).
SCRIPTS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "scripts").glob("*.py")
                 if 'if __name__ == "__main__":' in p.read_text())


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_entry_point_documents_itself(name, capsys):
    """``python -m scripts.<name> --help`` exits 0 with a usage line (the layering rules are tests/test_layering.py)."""
    import importlib

    module = importlib.import_module(f"scripts.{name}")
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0 and "usage" in capsys.readouterr().out.lower()
