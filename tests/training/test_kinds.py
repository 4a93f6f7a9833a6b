"""The per-kind specs through the one trainer: question-answer samples (image), the text LM and the CLIP
encoder, each on tiny shards in one CPU process, fp32 (configs/deepspeed/cpu_fp32.json) through the
shipped synthetic-road run configs with only paths and lengths overridden."""

import json
from pathlib import Path

import pytest
import torch
import webdataset as wds
from safetensors.torch import load_file

from adapters.chat import IGNORE_INDEX, encode_header, image_input_id
from adapters.checkpoint import load_llama
from adapters.tokenizer import Tokenizer
from media.tar import expand_shards
from scripts import train as train_script
from training.config import TrainConfigError, load_run_config
from training.codecs import ImageCaptionCodec
from training.data import BadSampleError, RawSample, ShardStream, TrainBatches
from training.spec import SPECS, TrainError
from training.text_lm import TextCodec
from training.trainer import build_model, train
from tests.tiny import build_tiny_tokenizer
from tests.training.test_data import COLORS, jpeg, write_shards
from vision.tiling import TilingConfig

QUESTIONS = {"color": "What color is the square?", "size": "Is the square wide or tall?"}


def qa_texts() -> list[str]:
    return [*QUESTIONS.values(), *COLORS, "wide", "tall", *(f"a {c} square" for c in COLORS)]


def make_qa_shards(root: Path, n_shards: int = 2, per_shard: int = 8) -> str:
    """Solid-colour rectangles with key.json {caption, question, answer, kind}, as synthetic/ writes them."""

    def sample(s: int, i: int) -> dict:
        color = list(COLORS)[(s * per_shard + i) % len(COLORS)]
        kind = "color" if i % 2 else "size"
        answer = color if kind == "color" else ("wide" if i % 4 == 0 else "tall")
        size = (56, 28) if answer == "wide" else (28, 56) if answer == "tall" else (40, 40)
        return {"__key__": f"q{s}_{i:03d}", "jpg": jpeg(COLORS[color], size), "txt": answer,
                "json": {"caption": f"a {color} square",
                         "meta": {"question": QUESTIONS[kind], "answer": answer, "kind": kind}}}

    return write_shards(root, "qa", n_shards, per_shard, sample)


@pytest.fixture(scope="module")
def qa(tmp_path_factory):
    root = tmp_path_factory.mktemp("qa")
    return root, make_qa_shards(root), build_tiny_tokenizer(root, texts=qa_texts())


def run_cfg(config: str, root: Path, run: str, *extra: str):
    """A shipped run config with only this test's paths and a short run."""
    return load_run_config(Path("configs") / config, [
        f"data.shards={root}/qa_{{00000..00001}}.tar", f"model.tokenizer={root}/tokenizer.model",
        f"train.run_dir={root / run}", "train.progress=false", "train.save_every=100", "data.shuffle_buffer=8",
        *extra])


def falls(losses: dict[int, float]) -> bool:
    values = [losses[s] for s in sorted(losses)]
    return all(torch.isfinite(torch.tensor(values))) and values[-1] < values[0] - 0.1


def test_qa_labels_only_the_answer_and_its_eot(qa):
    root, pattern, tok = qa
    raw = next(ShardStream(expand_shards(pattern), shuffle_buffer=1).epoch(0))
    meta = json.loads(raw.members["json"])["meta"]
    codec = ImageCaptionCodec(tok, TilingConfig(tile_size=56, max_tiles=2), fmt="qa")
    ex = codec.decode(raw)
    labelled = [t for t, lab in zip(ex.tokens, ex.labels) if lab != IGNORE_INDEX]
    assert labelled == tok.encode(meta["answer"]) + [tok.eot_id]
    assert all(lab == IGNORE_INDEX or lab == t for t, lab in zip(ex.tokens, ex.labels))
    # user turn: <|image|> then this sample's own question, before the assistant header
    user = encode_header(tok, "user")
    start = ex.tokens.index(user[0]) + len(user)
    assert ex.tokens[start] == image_input_id(tok)
    assert ex.tokens[start + 1 : start + 1 + len(tok.encode(meta["question"]))] == tok.encode(meta["question"])
    text = TextCodec(tok, "qa").decode(raw)  # the text kind: same dialog without the image
    assert image_input_id(tok) not in text.tokens
    assert [t for t, lab in zip(text.tokens, text.labels) if lab != IGNORE_INDEX] == labelled


def test_qa_samples_without_question_or_answer_are_named_or_counted(qa, tmp_path):
    _, _, tok = qa
    bad = tmp_path / "bad_00000.tar"
    with wds.TarWriter(str(bad)) as w:
        w.write({"__key__": "good", "jpg": jpeg(COLORS["red"]), "json": {"meta": {"question": "What color?", "answer": "red"}}})
        w.write({"__key__": "noq", "jpg": jpeg(COLORS["red"]), "json": {"meta": {"answer": "red"}}})
        w.write({"__key__": "noa", "jpg": jpeg(COLORS["red"]), "json": {"meta": {"question": "What color?", "answer": ""}}})
        w.write({"__key__": "nojson", "jpg": jpeg(COLORS["red"]), "txt": "red"})
    raws = {r.key: r for r in ShardStream([bad], shuffle_buffer=1).epoch(0)}
    codec = ImageCaptionCodec(tok, TilingConfig(tile_size=56, max_tiles=1), fmt="qa")
    for key, field in (("noq", "'question'"), ("noa", "'answer'"), ("nojson", "no json")):
        with pytest.raises(BadSampleError, match=rf"bad_00000.tar: sample {key}.*{field}"):
            codec.decode(raws[key])
    batches = TrainBatches(ShardStream([bad], shuffle_buffer=1), codec, tok.pad_id, 64, 64, 1, on_error="count")
    assert next(batches).keys == [f"{bad}:good"]
    next(batches)  # the next epoch's good sample: the three bad ones were counted on the way
    assert batches.bad == {str(bad): ["noq", "noa", "nojson"]}


def test_text_conversations_are_checked_like_the_media_kinds_and_hold_no_placeholder():
    turns = {"meta": {"conversations": [{"role": "user", "content": "hi"}]}}
    raw = RawSample("d.tar", "k", {"json": json.dumps(turns).encode()}, 0, 0)
    with pytest.raises(BadSampleError, match="d.tar: sample k.json: conversations: no assistant turn"):
        TextCodec(None, "conversation").decode(raw)
    raw.members["json"] = json.dumps({"meta": {"conversations": [{"role": "robot", "content": "hi"}]}}).encode()
    with pytest.raises(BadSampleError, match=r"conversations\[0\].role 'robot'"):
        TextCodec(None, "conversation").decode(raw)
    raw.members["json"] = b'{"meta": {}}'
    with pytest.raises(BadSampleError, match="no 'conversations' list"):
        TextCodec(None, "conversation").decode(raw)
    raw.members["json"] = b'{"conversations": []}'  # the builders keep sidecar fields under "meta"
    with pytest.raises(BadSampleError, match="no 'meta' object"):
        TextCodec(None, "conversation").decode(raw)
    media = [{"role": "user", "content": "<|image|>What is it?"}, {"role": "assistant", "content": "red"}]
    raw.members["json"] = json.dumps({"meta": {"conversations": media}}).encode()
    with pytest.raises(BadSampleError, match=r"conversations\[0\] holds <\|image\|>.*text kind"):
        TextCodec(None, "conversation").decode(raw)


def test_text_conversation_labels_every_assistant_turn(qa):
    _, _, tok = qa
    turns = [{"role": "user", "content": "What color is the square?"}, {"role": "assistant", "content": "red"},
             {"role": "user", "content": "Is the square wide or tall?"}, {"role": "assistant", "content": "tall"}]
    raw = RawSample("d.tar", "k", {"json": json.dumps({"meta": {"conversations": turns}}).encode()}, 0, 0)
    ex = TextCodec(tok, "conversation").decode(raw)
    labelled = [t for t, lab in zip(ex.tokens, ex.labels) if lab != IGNORE_INDEX]
    assert labelled == tok.encode("red") + [tok.eot_id] + tok.encode("tall") + [tok.eot_id]


def test_config_checks_formats_and_layouts_against_the_spec():
    with pytest.raises(TrainConfigError, match=r"data.format: 'caption' is not one of kind text's formats"):
        load_run_config(None, ["kind=text"])
    with pytest.raises(TrainConfigError, match="data.format: 'qa' is not one of kind speech's"):
        load_run_config(None, ["kind=speech", "data.format=qa"])
    with pytest.raises(TrainConfigError, match="parallel: pipeline lays out the image model only, not kind 'clip'"):
        load_run_config(None, ["kind=clip", "parallel=pipeline"])
    kinds = r"\('image', 'video', 'speech', 'text', 'clip', 'bestrq', 'reward', 'dpo'\)"
    with pytest.raises(TrainConfigError, match=rf"kind: 'audio' is not one of {kinds}"):
        load_run_config(None, ["kind=audio"])
    for name in ("clip", "text", "image_qa", "video_qa", "bestrq"):
        cfg = load_run_config(Path("configs") / f"run_{name}_synthetic.yaml")
        assert cfg.data.format in SPECS[cfg.kind].formats and cfg.model.preset == "tiny"


def test_a_run_config_whose_shards_do_not_exist_exits_2_naming_them(tmp_path, capsys):
    argv = ["--config", "configs/run_text_synthetic.yaml", "--set", f"data.shards={tmp_path}/none/shard_*.tar",
            "--set", f"train.run_dir={tmp_path / 'run'}"]
    assert train_script.main(argv) == 2
    assert f"no shards match {tmp_path}/none/shard_*.tar" in capsys.readouterr().err


def test_image_qa_run_learns_the_answers(qa):
    root, _, _ = qa
    cfg = run_cfg("run_image_qa_synthetic.yaml", root, "image_qa", "model.lm=null", "model.encoder_from=null",
                  "train.steps=8", "optim.warmup=1", "data.max_rows=4")
    result = train(cfg)
    assert falls(result.losses), result.losses
    assert (result.export_dir / "config.json").is_file()


def test_text_lm_trains_and_is_the_frozen_lm_of_an_image_run(qa):
    root, _, _ = qa
    result = train(run_cfg("run_text_synthetic.yaml", root, "text", "train.steps=8", "optim.warmup=1",
                           "data.max_rows=8"))
    assert falls(result.losses), result.losses
    lm = load_llama(result.export_dir)
    assert (result.export_dir / "tokenizer.model").is_file()
    image_cfg = run_cfg("run_image_qa_synthetic.yaml", root, "x", f"model.lm={result.export_dir}",
                        f"model.tokenizer={result.export_dir}/tokenizer.model", "model.encoder_from=null")
    model = build_model(image_cfg, Tokenizer(image_cfg.model.tokenizer))
    for name, want in lm.state_dict().items():
        assert torch.equal(model.lm.state_dict()[name], want), name
    assert not any(p.requires_grad for p in model.lm.parameters())


def test_clip_trains_and_its_encoder_starts_the_image_model(qa, tmp_path):
    root, _, tok = qa
    result = train(run_cfg("run_clip_synthetic.yaml", root, "clip", "train.steps=8", "optim.warmup=1",
                           "data.max_rows=8"))
    assert falls(result.losses), result.losses
    weights = load_file(result.export_dir / "model.safetensors")
    image_cfg = run_cfg("run_image_qa_synthetic.yaml", root, "x", "model.lm=null",
                        f"model.encoder_from={result.export_dir}")
    model = build_model(image_cfg, tok)
    assert torch.equal(model.vision.conv1.weight, weights["conv1.weight"])
    assert torch.equal(model.vision.transformer.resblocks[0].mlp.c_fc.weight,
                       weights["transformer.resblocks.0.mlp.c_fc.weight"])
    meta = json.loads((result.export_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**meta, "config": {**meta["config"], "width": 32}}))
    with pytest.raises(TrainError, match=r"config.json: config.width is 32, the image preset's is 64"):
        build_model(run_cfg("run_image_qa_synthetic.yaml", root, "x", "model.lm=null",
                            f"model.encoder_from={tmp_path}"), tok)
    (tmp_path / "config.json").write_text(json.dumps({**meta, "format": "llama3-mm-clip-encoder/1"}))
    with pytest.raises(TrainError, match=r"model.encoder_from: .*config.json: format "
                                         r"'llama3-mm-clip-encoder/1', expected format 'llama3-mm/clip-encoder/1'"):
        build_model(run_cfg("run_image_qa_synthetic.yaml", root, "x", "model.lm=null",
                            f"model.encoder_from={tmp_path}"), tok)
