"""training.data and training.config: shard order, per-rank split, exact resume, packing, named errors."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from adapters.chat import IGNORE_INDEX
from training.config import TrainConfigError, load_deepspeed_config, load_run_config, resolve_deepspeed
from media.tar import ShardError, expand_shards
from training.codecs import ImageCaptionCodec, encode_sample
from training.data import BadSampleError, ShardStream, TrainBatches, RawSample
from tests.tiny import build_tiny_tokenizer
from vision.tiling import TilingConfig

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
LONG = " on a plain background with nothing else in the picture"


def caption_texts() -> list[str]:
    return [f"a {c} square{LONG}" for c in COLORS] + ["Describe the image."]


def jpeg(color, size=(56, 40)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), color, np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write_shards(root: Path, name: str, n_shards: int, per_shard: int, sample) -> str:
    """``n_shards`` tars ``name_NNNNN.tar`` of ``sample(shard, i)`` dicts; returns their brace pattern."""
    root.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with wds.TarWriter(str(root / f"{name}_{s:05d}.tar")) as w:
            for i in range(per_shard):
                w.write(sample(s, i))
    return f"{root}/{name}_{{00000..{n_shards - 1:05d}}}.tar"


def make_image_shards(root: Path, n_shards: int = 3, per_shard: int = 5) -> str:
    """Tiny image-caption shards (key.jpg, key.txt, key.json) of solid colours; every other caption long."""

    def sample(s: int, i: int) -> dict:
        name = list(COLORS)[(s * per_shard + i) % len(COLORS)]
        cap = f"a {name} square" + (LONG if i % 2 else "")
        return {"__key__": f"s{s}_{i:03d}", "jpg": jpeg(COLORS[name], (56, 32 + 8 * (i % 3))), "txt": cap,
                "json": {"caption": cap}}

    return write_shards(root, "shard", n_shards, per_shard, sample)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    return make_image_shards(root), build_tiny_tokenizer(root, texts=caption_texts())


def batches(pattern, tok, rank=0, world=1, seed=0, buffer=4, max_tokens=120, max_rows=4, on_error="raise",
            max_seq_len=40, pack_rows=False):
    stream = ShardStream(expand_shards(pattern), rank, world, seed, buffer)
    codec = ImageCaptionCodec(tok, TilingConfig(tile_size=56, max_tiles=2))
    return TrainBatches(stream, codec, tok.pad_id, max_seq_len=max_seq_len, max_tokens=max_tokens,
                        max_rows=max_rows, on_error=on_error, pack_rows=pack_rows)


def keys(it, n):
    return [next(it).keys for _ in range(n)]


def test_shuffle_is_seeded_per_epoch_and_ranks_split_the_shards(shards):
    pattern, _ = shards
    stream = ShardStream(expand_shards(pattern), seed=0, shuffle_buffer=4)
    first = [s.key for s in stream.epoch(0)]
    assert first == [s.key for s in ShardStream(expand_shards(pattern), seed=0, shuffle_buffer=4).epoch(0)]
    assert sorted(first) == sorted(s.key for s in stream.epoch(1)) and first != [s.key for s in stream.epoch(1)]
    assert first != [s.key for s in ShardStream(expand_shards(pattern), seed=1, shuffle_buffer=4).epoch(0)]
    assert len(first) == 15 and len(set(first)) == 15
    per_rank = [[s.key for s in ShardStream(expand_shards(pattern), r, 2, seed=0).epoch(0)] for r in (0, 1)]
    assert not set(per_rank[0]) & set(per_rank[1]) and sorted(per_rank[0] + per_rank[1]) == sorted(first)


def test_resume_gives_the_same_next_batches(shards):
    pattern, tok = shards
    ref = batches(pattern, tok)
    taken = [next(ref) for _ in range(9)]  # ~2 epochs: the resume point and the rest cross an epoch boundary
    it = batches(pattern, tok)
    for _ in range(4):
        next(it)
    state = json.loads(json.dumps(it.state_dict()))  # what a checkpoint stores
    resumed = batches(pattern, tok)
    resumed.load_state_dict(state)
    for want in taken[4:]:
        got = next(resumed)
        assert got.keys == want.keys
        assert (got.tokens == want.tokens).all() and (got.labels == want.labels).all()
        assert (got.media["images"].tiles == want.media["images"].tiles).all()
    assert resumed.samples_delivered == sum(len(b.keys) for b in taken)


def test_packing_fills_the_token_budget_with_whole_samples(shards):
    pattern, tok = shards
    it = batches(pattern, tok, max_tokens=90, max_rows=6)
    seen = []
    for _ in range(20):
        mb = next(it)
        B, T = mb.tokens.shape
        assert B <= 6 and B * T <= 90 and len(mb.keys) == B
        assert mb.media["images"].tiles.shape[:2] == (B, 1)
        seen += mb.keys
        if it.state_dict()["epoch"] >= 1:
            break
    epoch0 = seen[: 15]
    assert sorted(epoch0) == sorted(set(epoch0)) and len(set(epoch0)) == 15  # every sample once per epoch
    short = batches(pattern, tok, max_tokens=90, max_rows=6)
    sizes = {len(mb.keys) for mb in (next(short) for _ in range(6))}
    assert max(sizes) > 1  # short captions share a micro-batch
    # Caption format: <bos><|image|> caption <eos>, labels on the caption and eos only.
    raw = RawSample("s.tar", "k", {"txt": b"a red square"}, 0, 0)
    toks, labels = encode_sample(tok, tok.n_words, raw, "caption", "")
    assert toks[:2] == [tok.bos_id, tok.n_words] and labels[:2] == [IGNORE_INDEX] * 2
    assert labels[2:] == toks[2:] and toks[-1] == tok.eos_id


def test_row_packing_puts_whole_samples_in_rows_with_document_ids(shards):
    pattern, tok = shards
    packed = batches(pattern, tok, max_tokens=200, max_rows=2, max_seq_len=80, pack_rows=True)
    stream = ShardStream(expand_shards(pattern), seed=0, shuffle_buffer=4).iterate()
    order = [f"{r.shard}:{r.key}" for r in (next(stream) for _ in range(60))]
    seen, shared = [], 0
    for _ in range(4):
        mb = next(packed)
        B, T = mb.tokens.shape
        doc_ids, images = mb.media["doc_ids"], mb.media["images"]
        assert B <= 2 and T <= 80 and B * T <= 200 and doc_ids.shape == (B, T)
        for b, row in enumerate(mb.keys):
            docs = row.split(";")
            seen += docs
            shared += len(docs) > 1
            real = doc_ids[b][doc_ids[b] >= 0]
            # Documents are contiguous, numbered from 0, each starting with <bos><|image|>, one image each.
            assert real.tolist() == sorted(real.tolist()) and int(real.max()) == len(docs) - 1
            starts = [int((doc_ids[b] == d).nonzero()[0]) for d in range(len(docs))]
            assert all(mb.tokens[b, s].item() == tok.bos_id and mb.tokens[b, s + 1].item() == tok.n_words
                       for s in starts)
            assert int(images.image_mask[b].sum()) == len(docs)
            assert (mb.labels[b, doc_ids[b] < 0] == IGNORE_INDEX).all()  # padding carries no label
    assert shared > 0 and seen == order[: len(seen)]  # stream order, each sample once, none split
    state = json.loads(json.dumps(packed.state_dict()))
    resumed = batches(pattern, tok, max_tokens=200, max_rows=2, max_seq_len=80, pack_rows=True)
    resumed.load_state_dict(state)
    assert next(resumed).keys == next(packed).keys


def test_bad_samples_raise_or_are_counted_by_shard_and_key(tmp_path, shards):
    _, tok = shards
    bad = tmp_path / "bad_00000.tar"
    with wds.TarWriter(str(bad)) as w:
        w.write({"__key__": "good", "jpg": jpeg(COLORS["red"]), "txt": "a red square"})
        w.write({"__key__": "broken", "jpg": b"not a jpeg at all", "txt": "a blue square"})
        w.write({"__key__": "nocap", "jpg": jpeg(COLORS["blue"])})
    with pytest.raises(BadSampleError, match=r"bad_00000.tar: sample (broken|nocap)"):
        strict = batches(str(bad), tok, buffer=1, max_rows=1)
        for _ in range(3):
            next(strict)
    it = batches(str(bad), tok, buffer=1, max_rows=1, on_error="count")
    assert next(it).keys == [f"{bad}:good"]
    next(it)  # the next epoch's good sample: the two bad ones were counted on the way
    assert it.bad == {str(bad): ["broken", "nocap"]} and it.n_bad == 2


def test_missing_or_truncated_shards_are_named(tmp_path, shards):
    pattern, tok = shards
    with pytest.raises(ShardError, match=r"shard_00003.tar not found \(5 of 8 missing\)"):
        expand_shards(pattern.replace("00002}", "00007}"))
    trunc = tmp_path / "trunc.tar"
    data = Path(pattern.split("{")[0] + "00000.tar").read_bytes()
    trunc.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(ShardError, match="trunc.tar"):
        list(ShardStream([trunc]).epoch(0))
    cut = tmp_path / "cut.tar"  # cut exactly between members: tarfile alone would stop silently
    cut.write_bytes(data[:6656])
    with pytest.raises(ShardError, match="cut.tar: truncated tar"):
        list(ShardStream([cut]).epoch(0))
    with pytest.raises(ShardError, match="3 shard\\(s\\) for 4 ranks"):
        ShardStream(expand_shards(pattern), 0, 4)


def test_config_is_strict_and_names_the_file_and_key(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("kind: image\ntrain:\n  steps: 3\n  stpes: 4\n")
    with pytest.raises(TrainConfigError, match=r"run.yaml: unknown key train.stpes"):
        load_run_config(cfg_file)
    cfg = load_run_config(None, ["train.steps=7", "optim.lr=3e-4"])
    assert cfg.train.steps == 7 and cfg.optim.lr == 3e-4
    with pytest.raises(TrainConfigError, match="run config: optim.lr: expected a number, got str 'fast'"):
        load_run_config(None, ["optim.lr=fast"])
    for path in sorted(Path("configs/train").glob("*.yaml")):
        load_run_config(path)  # every shipped example stays valid
    ds = load_deepspeed_config("configs/deepspeed/zero1_bf16_fp32accum.json")
    assert resolve_deepspeed(ds, 4, "x")["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds[
        "gradient_accumulation_steps"] * 4
    with pytest.raises(TrainConfigError, match="needs zero_optimization.stage 1"):
        resolve_deepspeed({**ds, "zero_optimization": {"stage": 2}}, 1, "zero2_fp32accum.json")
    resolve_deepspeed(load_deepspeed_config("configs/deepspeed/zero2.json"), 2, "zero2.json")
