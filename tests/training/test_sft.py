"""SFT with the frozen LM hot-swapped (``model.swap_lm``, Llama 3 sec. 7.5): a pre-trained tiny image export
(around a "base" LM, held by reference) fine-tuned through the shipped configs/train/*_sft.yaml with only
paths and lengths overridden, onto an "instruct" LM of the same config (another seed). One CPU process,
fp32 (configs/deepspeed/cpu_fp32.json)."""

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from adapters.checkpoint import load_llama, save_meta_checkpoint
from adapters.llama import build_llama, llama_config
from adapters.model_io import LMMismatchError, lm_fingerprint, load_checkpoint
from scripts import demo_vqa
from speech.adapter import build_speech_llama
from speech.model_io import save_speech_checkpoint
from training.config import TrainConfigError, load_run_config
from training.trainer import build_model, train
from tests.tiny import build_tiny_tokenizer, tiny_asr_config
from tests.training.test_kinds import make_qa_shards, qa_texts

# Same config as the base LM, other weights; then one size and the vocabulary changed.
LMS = {"base": (0, {}), "instruct": (1, {}), "wide": (2, {"dim": 128}), "vocab": (3, {"vocab_size": 8})}


@pytest.fixture(scope="module")
def pre(tmp_path_factory):
    """Shards, tokenizer, the four LMs (Meta layout) and a 2-step pre-training run around ``base``."""
    root = tmp_path_factory.mktemp("sft")
    make_qa_shards(root)
    tok = build_tiny_tokenizer(root, texts=qa_texts())
    for name, (seed, changes) in LMS.items():
        torch.manual_seed(seed)
        base = replace(llama_config("tiny"), vocab_size=tok.n_words)
        cfg = replace(base, **{k: v + (tok.n_words if k == "vocab_size" else 0) for k, v in changes.items()})
        save_meta_checkpoint(build_llama(cfg), root / name)
    cfg = load_run_config(Path("configs/run_image_qa_synthetic.yaml"), [
        *paths(root, "pre"), f"model.lm={root / 'base'}", "model.encoder_from=null", "train.steps=2",
        "optim.warmup=1"])
    return root, tok, train(cfg).export_dir


def paths(root: Path, run: str) -> list[str]:
    return [f"data.shards={root}/qa_{{00000..00001}}.tar", f"model.tokenizer={root}/tokenizer.model",
            f"train.run_dir={root / run}", "train.progress=false", "train.save_every=100", "data.shuffle_buffer=8",
            "deepspeed=configs/deepspeed/cpu_fp32.json", "data.max_seq_len=64", "data.max_tokens=256",
            "data.max_rows=4"]


def sft_cfg(root: Path, init_from: Path, run: str, lm: str = "instruct", *extra: str, config: str = "image_sft"):
    """The shipped SFT config with this test's paths and a short run."""
    return load_run_config(Path("configs/train") / f"{config}.yaml", [
        *paths(root, run), f"model.init_from={init_from}", f"model.lm={root / lm}", "train.steps=3",
        "optim.warmup=1", "optim.lr=1e-3", *extra])


def assert_swapped(model: torch.nn.Module, export: Path, lm: Path) -> None:
    """Every weight of ``export`` bitwise in ``model``, and ``lm``'s weights as its LM."""
    saved = load_file(export / "model.safetensors")
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("lm.")}
    assert set(saved) <= set(own) and not any(k.startswith("lm.") for k in saved)
    for name, want in saved.items():
        assert torch.equal(own[name], want), name
    for name, want in load_llama(lm).state_dict().items():
        assert torch.equal(model.lm.state_dict()[name], want), name
    assert not any(p.requires_grad for p in model.lm.parameters())


def test_sft_trains_around_the_instruct_lm_and_its_export_records_it(pre, capsys):
    root, tok, export = pre
    cfg = sft_cfg(root, export, "sft")
    assert cfg.data.format == "qa" and cfg.model.swap_lm
    assert_swapped(build_model(cfg, tok), export, root / "instruct")  # the weights the run starts from
    result = train(cfg)
    assert sorted(result.losses) == [1, 2, 3] and all(torch.isfinite(torch.tensor(list(result.losses.values()))))
    meta = json.loads((result.export_dir / "config.json").read_text())
    assert meta["lm_path"] == str((root / "instruct").resolve())
    assert meta["lm_fingerprint"] == lm_fingerprint(load_llama(root / "instruct"))
    assert meta["lm_fingerprint"] != json.loads((export / "config.json").read_text())["lm_fingerprint"]
    trained = load_checkpoint(result.export_dir)
    assert torch.equal(trained.lm.tok_embeddings.weight, load_llama(root / "instruct").tok_embeddings.weight)
    with pytest.raises(LMMismatchError, match="fingerprint"):
        load_checkpoint(result.export_dir, lm_path=root / "base")  # the SFT model expects the instruct LM
    Image.new("RGB", (40, 40), (220, 30, 30)).save(root / "red.png")
    argv = ["--image", str(root / "red.png"), "--question", "What color is the square?", "--checkpoint",
            str(result.export_dir), "--max-new-tokens", "4"]
    assert demo_vqa.main(argv) == 0
    assert capsys.readouterr().out.strip()


def test_without_swap_lm_another_lm_is_still_refused(pre):
    root, tok, export = pre
    with pytest.raises(LMMismatchError, match=r"instruct: same config, but .* differ \(fingerprint"):
        build_model(sft_cfg(root, export, "x", "instruct", "model.swap_lm=false"), tok)


@pytest.mark.parametrize("lm, field", [("wide", "dim 64 (recorded) vs 128"),
                                       ("vocab", "vocab_size {n} (recorded) vs {m}")])
def test_swap_lm_refuses_another_size_or_vocabulary(pre, lm, field):
    root, tok, export = pre
    field = field.format(n=tok.n_words, m=tok.n_words + 8)
    want = f"the LM {root / lm} cannot replace the export's: config differs: {field}"
    with pytest.raises(LMMismatchError, match=re.escape(want)):
        build_model(sft_cfg(root, export, "x", lm), tok)


def test_video_sft_swaps_the_lm_of_an_image_or_video_export(pre):
    root, tok, export = pre
    model = build_model(sft_cfg(root, export, "v", config="video_sft"), tok)
    assert model.video is not None
    assert_swapped(model, export, root / "instruct")
    with pytest.raises(LMMismatchError, match="vocab_size"):
        build_model(sft_cfg(root, export, "v", "vocab", config="video_sft"), tok)


def test_speech_export_swaps_its_held_lm(pre, tmp_path):
    root, tok, _ = pre
    base = load_llama(root / "base")
    model = build_speech_llama(replace(tiny_asr_config(tok), lm=base.cfg), base)
    export = save_speech_checkpoint(model, tmp_path / "speech")
    cfg = load_run_config(None, ["kind=speech", f"model.init_from={export}", f"model.lm={root / 'instruct'}",
                                 "model.swap_lm=true", f"model.tokenizer={root}/tokenizer.model"])
    swapped = build_model(cfg, tok)
    for name, want in model.state_dict().items():
        if not name.startswith("lm."):
            assert torch.equal(swapped.state_dict()[name], want), name
    for name, want in load_llama(root / "instruct").state_dict().items():
        assert torch.equal(swapped.lm.state_dict()[name], want), name
    with pytest.raises(LMMismatchError, match="dim 64 .recorded. vs 128"):
        build_model(replace(cfg, model=replace(cfg.model, lm=str(root / "wide"))), tok)


def test_swap_lm_needs_an_export_and_an_lm_and_a_kind_that_has_one():
    for extra in (["model.lm=x"], ["model.init_from=x"], ["kind=text", "data.format=qa", "model.lm=x",
                                                          "model.init_from=x"]):
        with pytest.raises(TrainConfigError, match=r"model.swap_lm: needs model.init_from .* \['image', 'video', "
                                                   r"'speech', 'reward', 'dpo'\] only"):
            load_run_config(None, ["model.swap_lm=true", *extra])
