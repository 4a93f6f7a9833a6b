"""The one export layout (`common.export`): every kind round-trips through its saver and loader, a directory
that is another kind's, an old format's or a foreign checkpoint is refused naming the file and both
formats, and a write that fails midway leaves no config.json."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from adapters.model_io import load_checkpoint, save_checkpoint
from adapters.multimodal import build_multimodal, multimodal_config
from common import export
from common.config import CheckpointError
from common.export import ExportFormatError, read_export, write_export
from speech.adapter import build_speech_llama, speech_llama_config
from speech.bestrq import BestRQConfig
from speech.conformer import conformer_config
from speech.features import LogMelConfig
from speech.model_io import load_speech_checkpoint, save_speech_checkpoint
from speech.pretrain import build_bestrq, load_bestrq, load_pretrained_encoder, save_pretrained
from training.clip import clip_vision_config, encoder_weights, export_clip
from training.config import RunConfig
from training.spec import TrainError


def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """One tiny export of each kind, and the models they were written from."""
    root = tmp_path_factory.mktemp("exports")
    torch.manual_seed(0)
    image = build_multimodal(multimodal_config("tiny"))
    speech = build_speech_llama(speech_llama_config("tiny"))
    bestrq = build_bestrq(conformer_config("tiny"), BestRQConfig(n_codebooks=2, codebook_size=64),
                          LogMelConfig())
    clip = nn.Module()
    clip.visual = image.vision  # what export_clip keeps of an open_clip model: its visual tower
    run = RunConfig(kind="clip")
    paths = {"multimodal": save_checkpoint(image, root / "image"),
             "speech": save_speech_checkpoint(speech, root / "speech"),
             "speech-encoder": save_pretrained(bestrq, LogMelConfig(), root / "encoder"),
             "clip-encoder": export_clip(clip, run, root / "clip")}
    return paths, {"multimodal": image, "speech": speech, "speech-encoder": bestrq, "clip": clip, "run": run}


def test_every_kind_round_trips_through_its_loader(exports):
    paths, models = exports
    for kind, path in paths.items():
        assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"], kind
        assert json.loads((path / "config.json").read_text())["format"] == f"llama3-mm/{kind}/1"
    assert same_state(load_checkpoint(paths["multimodal"]), models["multimodal"])
    speech = load_speech_checkpoint(paths["speech"])
    assert same_state(speech, models["speech"]) and not speech.training
    assert not any(p.requires_grad for p in speech.lm.parameters())
    assert same_state(load_bestrq(paths["speech-encoder"]), models["speech-encoder"])
    assert same_state(load_pretrained_encoder(paths["speech-encoder"]), models["speech-encoder"].encoder)
    weights = encoder_weights(paths["clip-encoder"], clip_vision_config(models["run"]))
    assert weights == paths["clip-encoder"] / "model.safetensors"
    visual, stored = models["clip"].visual.state_dict(), load_file(weights)
    assert stored.keys() == visual.keys() and all(torch.equal(stored[k], visual[k]) for k in visual)


def test_a_tied_lm_is_stored_once_and_comes_back_tied(tmp_path):
    cfg = speech_llama_config("tiny")
    model = build_speech_llama(replace(cfg, lm=replace(cfg.lm, tie_embeddings=True)))
    path = save_speech_checkpoint(model, tmp_path / "tied")
    assert "lm.output.weight" not in load_file(path / "model.safetensors")
    loaded = load_speech_checkpoint(path)
    assert loaded.lm.output.weight is loaded.lm.tok_embeddings.weight and same_state(loaded, model)


@pytest.mark.parametrize("kind, load", [
    ("multimodal", load_checkpoint), ("speech", load_speech_checkpoint),
    ("speech-encoder", load_pretrained_encoder), ("speech-encoder", load_bestrq),
])
def test_another_kinds_export_is_refused_naming_the_file_and_both_formats(exports, kind, load):
    for other, path in exports[0].items():
        if other == kind:
            continue
        with pytest.raises(ExportFormatError) as e:
            load(path)
        assert str(e.value) == (f"{path / 'config.json'}: format 'llama3-mm/{other}/1', expected format "
                                f"'llama3-mm/{kind}/1'")
        assert e.value.found_kind == other


def test_a_clip_encoder_dir_of_another_kind_is_a_train_error(exports):
    paths, models = exports
    with pytest.raises(TrainError, match=r"model.encoder_from: .*speech/config.json: format "
                                         r"'llama3-mm/speech/1', expected format 'llama3-mm/clip-encoder/1'"):
        encoder_weights(paths["speech"], clip_vision_config(models["run"]))


@pytest.mark.parametrize("files, message", [
    ({}, "config.json: not found; expected an export of format 'llama3-mm/speech/1'"),
    ({"params.json": "{}"}, "config.json: not found (params.json found: a Meta checkpoint, not our export)"),
    ({"config.json": json.dumps({"model_type": "llama", "hidden_size": 64})},
     "config.json: no 'format' key (an HF config (model_type 'llama')), "
     "expected format 'llama3-mm/speech/1'"),
    ({"config.json": json.dumps({"format": "llama3-speech/1", "config": {}})},  # our format before this one
     "config.json: format 'llama3-speech/1', expected format 'llama3-mm/speech/1'"),
    ({"encoder_config.json": "{}"}, "config.json: not found"),  # an old speech-encoder run
    ({"config.json": "{not json"}, "config.json: not valid JSON"),
    ({"config.json": "[]"}, "config.json: expected an object, got list"),
    ({"config.json": json.dumps({"format": "llama3-mm/speech/1", "config": 3})},
     "config.json: no 'config' object"),
    ({"config.json": json.dumps({"format": "llama3-mm/speech/1", "config": {}, "lm_path": "x"})},
     "config.json: unknown keys ['lm_path'] for format 'llama3-mm/speech/1'"),
    ({"config.json": json.dumps({"format": "llama3-mm/speech/1", "config": {}})},
     "model.safetensors: not found (config.json says format 'llama3-mm/speech/1')"),
    ({"config.json": json.dumps({"format": "llama3-mm/speech/1", "config": {}}), "model.safetensors": "junk"},
     "model.safetensors: cannot read safetensors"),
])
def test_foreign_old_or_damaged_directories_are_named(tmp_path, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ExportFormatError) as e:
        read_export(tmp_path, ("speech",))
    assert str(e.value).startswith(f"{tmp_path}/") and message in str(e.value)
    assert isinstance(e.value, CheckpointError) and e.value.found_kind is None


def test_the_config_is_read_strictly_before_the_weights(tmp_path):
    from speech.adapter import SpeechLlamaConfig

    (tmp_path / "config.json").write_text(json.dumps({"format": "llama3-mm/speech/1", "config": {"typo": 1}}))
    (tmp_path / "model.safetensors").write_text("junk: never read")
    with pytest.raises(CheckpointError, match=r"config.json: unknown key typo \(known in the top level: \['adapter'"):
        read_export(tmp_path, ("speech",), config_cls=SpeechLlamaConfig)


def test_a_path_that_is_not_a_directory_is_named(tmp_path):
    with pytest.raises(ExportFormatError, match=r"config.json: not found \(.*nope is not a directory\)"):
        read_export(tmp_path / "nope", ("multimodal", "speech"))


def test_the_writer_refuses_unknown_kinds_and_extras_that_overwrite_its_keys(tmp_path):
    with pytest.raises(ValueError, match="export kind 'video' is not one of"):
        write_export(tmp_path, "video", {}, {})
    with pytest.raises(ValueError, match=r"extra_meta may not set \['format'\]"):
        write_export(tmp_path, "speech", {}, {}, extra_meta={"format": "x"})
    assert not list(tmp_path.iterdir())


def test_a_failed_write_leaves_no_config_json_and_no_temporary_file(tmp_path, monkeypatch):
    out = write_export(tmp_path / "out", "speech", {"a": 1}, {"w": torch.ones(2)})  # a complete older export
    assert read_export(out, ("speech",))[1]["config"] == {"a": 1}

    def crash(tensors, filename):  # dies halfway through the weights
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        write_export(out, "speech", {"a": 2}, {"w": torch.zeros(2)})
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]  # the old weights, no marker
    with pytest.raises(ExportFormatError, match="config.json: not found"):
        read_export(out, ("speech",))
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError):  # the tokenizer to copy is missing: still no config.json
        write_export(out, "speech", {"a": 3}, {"w": torch.zeros(2)},
                     tokenizer_path=tmp_path / "missing.model")
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
