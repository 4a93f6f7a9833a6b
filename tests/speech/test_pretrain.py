"""The BEST-RQ model's export (`speech.pretrain.save_pretrained`) and its strict loaders. Training it is the
trainer's ``bestrq`` kind: tests/training/test_bestrq.py."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters.checkpoint import CheckpointError
from speech.bestrq import BestRQConfig
from speech.conformer import ConformerEncoder, conformer_config
from speech.features import LogMel, LogMelConfig
from speech.pretrain import (EncoderExportConfig, build_bestrq, load_bestrq, load_pretrained_encoder,
                             read_encoder_config, save_pretrained)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny BEST-RQ model (4 codebooks of 256 codes) with moved weights, saved: (model, None, export dir)."""
    torch.manual_seed(0)
    model = build_bestrq(conformer_config("tiny"), BestRQConfig(n_codebooks=4, codebook_size=256), LogMelConfig())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # not the fresh init: a load that rebuilt it would be caught
    return model.eval(), None, save_pretrained(model, LogMelConfig(), tmp_path_factory.mktemp("run"))


def mel_batch():
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([16_000, 12_000, 9_000])
    return LogMel()(0.1 * torch.randn(3, 16_000, generator=g), lengths)


def test_saved_encoder_loads_strictly_and_matches_the_saved_one(trained):
    model, _, out = trained
    assert read_encoder_config(out) == EncoderExportConfig(model.encoder.cfg, model.cfg, LogMelConfig())
    encoder = load_pretrained_encoder(out)
    assert isinstance(encoder, ConformerEncoder) and not encoder.training
    assert set(load_file(out / "model.safetensors")) == set(model.state_dict())  # encoder under "encoder."
    mel, frames = mel_batch()
    with torch.no_grad():
        h, lengths = encoder(mel, frames)
        ref, ref_lengths = model.encoder(mel, frames)
    assert torch.equal(h, ref) and torch.equal(lengths, ref_lengths)
    # The whole BEST-RQ state (heads, frozen quantizer) comes back too: same loss on the same masks.
    resumed = load_bestrq(out)
    with torch.no_grad():
        a = resumed(mel, frames, generator=torch.Generator().manual_seed(1))
        b = model(mel, frames, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["targets"], b["targets"])


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["config"]["encoder"].update(dim_typo=3), "unknown key encoder.dim_typo"),
    (lambda m: m["config"].pop("bestrq"), "config.json: missing key bestrq"),
    (lambda m: m["config"]["bestrq"].update(codebook_size="256"), "bestrq.codebook_size: expected an integer"),
    (lambda m: m.update(extra=1), "unknown keys ['extra']"),
    (lambda m: m.update(format="llama3-mm/speech/1"),
     "format 'llama3-mm/speech/1', expected format 'llama3-mm/speech-encoder/1'"),
    (lambda m: m["config"]["encoder"].update(n_heads=5), "n_heads 5 must divide dim 64"),
])
def test_bad_checkpoint_config_is_a_checkpoint_error(trained, tmp_path, edit, message):
    out = shutil.copytree(trained[2], tmp_path / "ckpt")
    meta = json.loads((out / "config.json").read_text())
    edit(meta)
    (out / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=re.escape(f"{out / 'config.json'}")) as e:
        load_pretrained_encoder(out)
    assert message in str(e.value)


def test_bad_checkpoint_weights_are_named(trained, tmp_path):
    out = shutil.copytree(trained[2], tmp_path / "ckpt")
    weights = out / "model.safetensors"
    sd = load_file(weights)
    save_file({**sd, "encoder.extra.weight": torch.zeros(1)}, str(weights))
    with pytest.raises(CheckpointError, match=re.escape(f"{weights} (encoder.*): unknown keys ['extra.weight']")):
        load_pretrained_encoder(out)
    with pytest.raises(CheckpointError, match=re.escape(f"{weights}: unknown keys ['encoder.extra.weight']")):
        load_bestrq(out)
    weights.unlink()
    with pytest.raises(CheckpointError, match="not found"):
        load_pretrained_encoder(out)
