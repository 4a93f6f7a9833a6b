"""The annealing mix (data.sources): weighted draws from several shard sources, each in its own sample format,
seeded and exactly resumable; the realised per-source counts in the run's log; each bad input named."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from adapters.chat import encode_header, image_input_id
from media.tar import ShardError, expand_shards
from training.codecs import ImageCaptionCodec, ImageConversationCodec
from training.config import TrainConfigError, load_run_config
from training.data import MixCodec, MixStream, ShardStream, TrainBatches
from training.trainer import source_shards, train
from tests.tiny import build_tiny_tokenizer
from tests.training.test_conversation import COMPARE, TEXT_ONLY, sample, texts, turns, two_images, write
from tests.training.test_data import COLORS, caption_texts, make_image_shards
from vision.tiling import TilingConfig

TILING = TilingConfig(tile_size=56, max_tiles=2)


def conversation(i: int) -> dict:
    """Every third one text-only, the others a two-image comparison."""
    if i % 3 == 2:
        return sample(f"t{i:03d}", TEXT_ONLY)
    first, second = list(COLORS)[i % 4], list(COLORS)[(i + 1) % 4]
    return sample(f"c{i:03d}", turns(("user", COMPARE), ("assistant", "first" if first == "red" else "second")),
                  two_images(first, second))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two caption sources (3 shards of 5 and 2 of 4 samples), one conversation source (2 shards of 6) and a
    tokenizer for all their texts."""
    root = tmp_path_factory.mktemp("mix")
    pairs = make_image_shards(root / "pairs")
    small = make_image_shards(root / "small", n_shards=2, per_shard=4)
    (root / "conv").mkdir()
    for s in range(2):
        write(root / "conv" / f"conv_{s:05d}.tar", [conversation(s * 6 + i) for i in range(6)])
    tok = build_tiny_tokenizer(root, texts=caption_texts() + texts())
    assert Path(tok.path) == root / "tokenizer.model"
    return root, {"pairs": pairs, "small": small, "conv": f"{root}/conv/conv_*.tar"}, tok


def mix(patterns: list[str], weights: list[float], seed: int = 0, buffer: int = 4) -> MixStream:
    streams = [ShardStream(expand_shards(p), seed=seed + 10 * i, shuffle_buffer=buffer) for i, p in enumerate(patterns)]
    return MixStream(streams, weights, seed)


def draws(stream: MixStream, n: int) -> list[tuple[int, str, str]]:
    it = stream.iterate_from(stream.start())
    return [(r.source, r.shard, r.key) for r in (next(it) for _ in range(n))]


def test_realised_proportions_match_the_weights_and_each_source_keeps_its_own_order(data):
    _, p, _ = data
    weights = [5.0, 3.0, 2.0]  # normalised: 0.5 / 0.3 / 0.2
    stream = mix([p["pairs"], p["small"], p["conv"]], weights)
    got = draws(stream, 2000)
    counts = np.bincount([s for s, _, _ in got], minlength=3)
    probs = np.asarray(weights) / sum(weights)
    se = np.sqrt(probs * (1 - probs) / len(got))
    assert (np.abs(counts / len(got) - probs) <= 3 * se).all(), (counts, probs)
    # Each source is an endless epoch-cycling stream of its own: its samples in the mix are its stream's order.
    for k, pattern in enumerate([p["pairs"], p["small"], p["conv"]]):
        alone = ShardStream(expand_shards(pattern), seed=10 * k, shuffle_buffer=4).iterate()
        mine = [(shard, key) for s, shard, key in got if s == k]
        assert len(mine) > 2 * 15  # past several epochs of every source
        assert mine == [(r.shard, r.key) for r in (next(alone) for _ in range(len(mine)))]


def test_same_seed_same_draws_another_seed_others(data):
    _, p, _ = data
    patterns = [p["pairs"], p["conv"]]
    first = draws(mix(patterns, [1, 1]), 300)
    assert first == draws(mix(patterns, [1, 1]), 300)
    assert [s for s, _, _ in first] != [s for s, _, _ in draws(mix(patterns, [1, 1], seed=1), 300)]
    assert MixStream.BLOCK < 2000  # the proportions test crossed a block of uniforms


def mixed_batches(tok, patterns: list[str], pack_rows: bool = False) -> TrainBatches:
    """A caption source and a conversation source, each through its own codec, collated as conversations."""
    codecs = [ImageCaptionCodec(tok, TILING), ImageConversationCodec(tok, TILING)]
    return TrainBatches(mix(patterns, [0.6, 0.4]), MixCodec(codecs, codecs[1], [True, False]), tok.pad_id,
                        max_seq_len=64, max_tokens=256, max_rows=4, pack_rows=pack_rows)


@pytest.mark.parametrize("pack_rows", [False, True])
def test_resume_continues_exactly_as_the_uninterrupted_stream(data, pack_rows):
    _, p, tok = data
    patterns = [p["pairs"], p["conv"]]
    whole = mixed_batches(tok, patterns, pack_rows)
    uninterrupted = [next(whole).keys for _ in range(12)]
    half = mixed_batches(tok, patterns, pack_rows)
    for _ in range(5):
        next(half)
    state = json.loads(json.dumps(half.state_dict()))  # plain values, as rank_R.pt holds them
    resumed = mixed_batches(tok, patterns, pack_rows)
    resumed.load_state_dict(state)
    assert resumed.source_samples == half.source_samples and sum(state["source_samples"]) == half.samples_delivered
    assert [next(resumed).keys for _ in range(7)] == uninterrupted[5:]
    assert resumed.source_samples == whole.source_samples


def test_each_source_decodes_in_its_own_format(data):
    _, p, tok = data
    batches = mixed_batches(tok, [p["pairs"], p["conv"]])
    image_id, user, seen = image_input_id(tok), encode_header(tok, "user"), set()
    for _ in range(6):
        mb = next(batches)
        images = mb.media["images"]
        for b, key in enumerate(mb.keys):
            row = mb.tokens[b][mb.tokens[b] != tok.pad_id].tolist()
            n_images = int(images.image_mask[b].sum())
            if "/conv/" in key:  # chat turns, one image per placeholder (none for a text-only conversation)
                seen.add("conv")
                assert row[1 : 1 + len(user)] == user
                assert row.count(image_id) == n_images == (0 if ":t" in key else 2)
            else:  # <bos><|image|>caption<eos>
                seen.add("pairs")
                assert row[:2] == [tok.bos_id, image_id] and row[-1] == tok.eos_id and n_images == 1
    assert seen == {"conv", "pairs"}
    assert sum(batches.source_samples) == batches.samples_delivered and min(batches.source_samples) > 0


def mix_run(root: Path, run: str, steps: int, *extra: str):
    sources = (f"[{{name: pairs, shards: '{root}/pairs/shard_*.tar', format: caption, weight: 0.7}}, "
               f"{{shards: '{root}/conv/conv_*.tar', format: conversation, weight: 0.3}}]")
    return load_run_config(Path("configs/run_image_qa_synthetic.yaml"), [
        "data.shards=", "data.format=caption", f"data.sources={sources}", f"model.tokenizer={root}/tokenizer.model",
        "model.lm=null", "model.encoder_from=null", "data.max_seq_len=64", "data.max_tokens=192", "data.max_rows=3",
        "data.shuffle_buffer=4", f"train.steps={steps}", "train.save_every=2", "train.log_every=2",
        "optim.warmup=1", f"train.run_dir={root / run}", "train.progress=false", *extra])


def test_a_tiny_run_on_two_sources_logs_the_realised_mix_and_resumes_exactly(data):
    root, _, _ = data
    cfg = mix_run(root, "run", 4)
    result = train(cfg)
    assert sorted(result.losses) == [1, 2, 3, 4]
    assert list(result.sources) == ["pairs", "sources[1]"]
    weights = {k: v["weight"] for k, v in result.sources.items()}
    assert weights == pytest.approx({"pairs": 0.7, "sources[1]": 0.3})
    counts = {k: v["samples"] for k, v in result.sources.items()}
    assert all(n > 0 for n in counts.values())
    assert sum(v["share"] for v in result.sources.values()) == pytest.approx(1.0)
    log = [json.loads(line) for line in (root / "run" / "losses.jsonl").read_text().splitlines()]
    assert [("sources" in r) for r in log] == [False, True, False, True] and log[-1]["sources"] == result.sources
    assert log[1]["sources"]["pairs"]["samples"] <= counts["pairs"]
    # Resumed from the step-2 checkpoint: the same samples, hence the same losses and counts.
    resumed_dir = root / "resumed"
    shutil.copytree(root / "run" / "checkpoints" / "step_2", resumed_dir / "checkpoints" / "step_2")
    (resumed_dir / "checkpoints" / "latest").write_text("step_2")
    resumed = train(replace(cfg, train=replace(cfg.train, run_dir=str(resumed_dir), export=False)))
    assert sorted(resumed.losses) == [3, 4]
    assert [resumed.losses[s] for s in (3, 4)] == [result.losses[s] for s in (3, 4)]
    assert resumed.sources == result.sources


def test_the_shipped_anneal_config_loads():
    cfg = load_run_config(Path("configs/train/image_anneal.yaml"))
    names = cfg.data.source_names()
    assert cfg.kind == "image" and cfg.model.init_from and not cfg.data.shards
    assert names == ["pairs", "charts", "grounding", "screenshots", "qa"]
    assert {s.format for s in cfg.data.sources} == {"caption", "conversation", "qa"}
    assert sum(s.weight for s in cfg.data.sources) == pytest.approx(1.0)


BAD = [  # (override, the error's message)
    ("data.sources=[{shards: a.tar, weight: 0}]", r"data.sources\[0\].weight: 0.0 must be > 0"),
    ("data.sources=[{shards: a.tar, weight: 1}, {shards: b.tar, weight: -2}]",
     r"data.sources\[1\].weight: -2.0 must be > 0"),
    ("data.sources=[{shards: a.tar, weight: 1}, {shards: b.tar, weight: lots}]",
     r"data.sources\[1\].weight: expected a number, got str 'lots'"),
    ("data.sources=[{shards: a.tar, weight: 1}, {shards: b.tar, weight: .nan}]",
     r"data.sources\[1\].weight: nan is not finite"),
    ("data.sources=[{shards: a.tar}]", r"missing key data.sources\[0\].weight"),
    ("data.sources=[]", r"data.sources: an empty list"),
    ("data.sources=[{shards: a.tar, weight: 1, format: preference}]",
     r"data.sources\[0\].format: 'preference' is not one of kind image's formats"),
    ("data.sources=[{shards: a.tar, weight: 1, name: x}, {shards: b.tar, weight: 1, name: x}]",
     r"data.sources\[1\].name: 'x' names an earlier source too"),
]


@pytest.mark.parametrize("override,message", BAD)
def test_bad_sources_are_named_by_their_field(override, message):
    with pytest.raises(TrainConfigError, match=message):
        load_run_config(None, [override])


def test_sources_with_shards_and_unmatched_or_too_few_shards_are_named(data):
    root, p, _ = data
    with pytest.raises(TrainConfigError, match="data.sources / data.shards: give one"):
        load_run_config(None, ["data.shards=x.tar", "data.sources=[{shards: a.tar, weight: 1}]"])
    with pytest.raises(TrainConfigError, match="data.sources / data.format: each source has its own format"):
        load_run_config(None, ["data.format=qa", "data.sources=[{shards: a.tar, weight: 1}]"])
    with pytest.raises(TrainConfigError, match=r"data.sources\[0\].format: conversation samples hold"):
        load_run_config(None, ["parallel=pipeline", "data.sources=[{shards: a, weight: 1, format: conversation}]"])
    cfg = load_run_config(None, [f"data.sources=[{{shards: '{root}/pairs/shard_*.tar', weight: 1}}, "
                                 f"{{shards: '{root}/nothing/shard_*.tar', weight: 1}}]"])
    with pytest.raises(ShardError, match=r"data.sources\[1\].shards: no shards match .*nothing/shard_\*.tar"):
        source_shards(cfg)
    with pytest.raises(ShardError, match=r"data.sources\[1\].shards: 2 shard\(s\) for 3 ranks"):
        ShardStream(expand_shards(p["small"]), 0, 3, where="data.sources[1].shards")
