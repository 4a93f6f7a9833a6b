"""data.format conversation (image kind): multi-turn, multi-image chat samples from hand-written tar shards;
labels on assistant turns only, text-only conversations in the same shard, bad samples named, a tiny run."""

import json
from pathlib import Path

import pytest
import torch
import webdataset as wds

from adapters.chat import IGNORE_INDEX, Message, encode_header, encode_training_example, image_input_id
from adapters.task import ImageTextTask
from training.config import TrainConfigError, load_run_config
from training.codecs import ImageConversationCodec
from training.data import BadSampleError, ShardStream, TrainBatches
from training.trainer import train
from tests.tiny import build_tiny_tokenizer, build_tiny_vqa_model
from tests.training.test_data import COLORS, jpeg
from vision.tiling import TilingConfig

TILING = TilingConfig(tile_size=56, max_tiles=2)
COMPARE = "Which image is red, <|image|> or <|image|>?"


def turns(*pairs: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in pairs]


def sample(key: str, conversation, images: dict[str, bytes] | None = None) -> dict:
    return {"__key__": key, "json": {"meta": {"conversations": conversation}}, **(images or {})}


def two_images(first: str = "red", second: str = "blue") -> dict[str, bytes]:
    return {"0.jpg": jpeg(COLORS[first]), "1.jpg": jpeg(COLORS[second], (40, 56))}


TWO_TURNS = turns(("system", "Answer in one word."), ("user", COMPARE), ("assistant", "first"),
                  ("user", "What color is the other one?"), ("assistant", "blue"))
TEXT_ONLY = turns(("user", "What color is the sky?"), ("assistant", "blue"))


def texts() -> list[str]:
    return [COMPARE, "Answer in one word.", "What color is the other one?", "What color is the sky?", "first",
            "second", *COLORS]


def write(path: Path, samples: list[dict]) -> Path:
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)
    return path


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"), texts=texts())


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """One shard: a 2-turn, 2-image conversation, a text-only one, and a lone key.png as image 0."""
    path = tmp_path_factory.mktemp("conv") / "conv_00000.tar"
    one = turns(("user", "<|image|>What color is the square?"), ("assistant", "green"))
    return write(path, [sample("two", TWO_TURNS, two_images()), sample("text", TEXT_ONLY),
                        sample("one", one, {"png": jpeg(COLORS["green"])})])


def raws(shard: Path) -> dict:
    return {r.key: r for r in ShardStream([shard], shuffle_buffer=1).epoch(0)}


def labelled(ex) -> list[int]:
    return [t for t, lab in zip(ex.tokens, ex.labels) if lab != IGNORE_INDEX]


def test_labels_cover_exactly_the_assistant_contents_and_their_eot(tok, mixed):
    ex = ImageConversationCodec(tok, TILING).decode(raws(mixed)["two"])
    assert labelled(ex) == tok.encode("first") + [tok.eot_id] + tok.encode("blue") + [tok.eot_id]
    want = [i for i, lab in enumerate(ex.labels) if lab != IGNORE_INDEX]
    header = encode_header(tok, "assistant")
    starts = [i + len(header) for i in range(len(ex.tokens)) if ex.tokens[i : i + len(header)] == header]
    spans = [range(s, s + len(tok.encode(w)) + 1) for s, w in zip(starts, ("first", "blue"))]
    assert want == [i for span in spans for i in span]
    # the image tokens stand where the placeholders were, in the first user turn
    img = image_input_id(tok)
    a, b, rest = COMPARE.split("<|image|>")
    user = encode_header(tok, "user")
    u = next(i for i in range(len(ex.tokens)) if ex.tokens[i : i + len(user)] == user) + len(user)
    body = tok.encode(a) + [img] + tok.encode(b) + [img] + tok.encode(rest)
    assert ex.tokens[u : u + len(body) + 1] == body + [tok.eot_id]
    assert ex.tokens.count(img) == 2 and len(ex.media) == 2
    assert [m.resized_size for m in ex.media] == [(56, 40), (40, 56)]  # key.0.jpg (wide) first, key.1.jpg second


def test_a_text_only_conversation_in_the_same_shard_is_the_plain_chat_example(tok, mixed):
    codec = ImageConversationCodec(tok, TILING)
    ex = codec.decode(raws(mixed)["text"])
    assert ex.media == []
    assert (ex.tokens, ex.labels) == encode_training_example(tok, [Message(t["role"], t["content"]) for t in TEXT_ONLY])
    one = codec.decode(raws(mixed)["one"])  # a lone key.png is image 0
    assert len(one.media) == 1 and one.tokens.count(image_input_id(tok)) == 1
    only_text = codec.collate([ex, ex])["images"]  # an all-text micro-batch keeps the image tensors' shape
    assert only_text.image_mask.shape == (2, 1) and not only_text.image_mask.any()


def test_multi_image_rows_batch_and_train_through_the_image_model(tok, mixed):
    batches = TrainBatches(ShardStream([mixed], shuffle_buffer=1), ImageConversationCodec(tok, TILING), tok.pad_id,
                           max_seq_len=128, max_tokens=1024, max_rows=3)
    mb = next(batches)
    images = mb.media["images"]
    rows = {k.rpartition(":")[2]: i for i, k in enumerate(mb.keys)}
    assert images.image_mask.shape[:2] == (3, 2)
    assert images.image_mask[rows["two"]].tolist() == [True, True]
    assert images.image_mask[rows["text"]].tolist() == [False, False]
    assert images.image_mask[rows["one"]].tolist() == [True, False]
    model = build_tiny_vqa_model(tok)
    out = ImageTextTask(model)(mb.tokens, mb.labels, **mb.media)
    assert torch.isfinite(out["loss"]) and int(out["n_tokens"]) == mb.n_label_tokens
    out["loss"].backward()
    assert model.cross_attention_layers[0].gate_attn.grad.abs().sum() > 0  # the images reach the loss
    packed = TrainBatches(ShardStream([mixed], shuffle_buffer=1), ImageConversationCodec(tok, TILING), tok.pad_id,
                          max_seq_len=256, max_tokens=1024, max_rows=3, pack_rows=True)
    mb = next(packed)  # several samples per row: a row carries all their images, in order
    mask = mb.media["images"].image_mask
    assert any(";" in k for k in mb.keys) and mask.sum(1).max() > 2
    assert mask.sum(1).tolist() == (mb.tokens == image_input_id(tok)).sum(1).tolist()
    assert all(row[: int(row.sum())].all() for row in mask)
    assert torch.isfinite(ImageTextTask(model)(mb.tokens, mb.labels, **mb.media)["loss"])


BAD = {
    "toomany": (turns(("user", COMPARE), ("assistant", "first")), {"0.jpg": jpeg(COLORS["red"])},
                r"2 <\|image\|> placeholder\(s\) but the sample has 1 image"),
    "toofew": (turns(("user", "<|image|>What color?"), ("assistant", "red")), two_images(),
               r"1 <\|image\|> placeholder\(s\) but the sample has 2 image"),
    "unplaced": (TEXT_ONLY, {"jpg": jpeg(COLORS["red"])}, r"0 <\|image\|> placeholder\(s\) but the sample has 1"),
    "gap": (turns(("user", COMPARE), ("assistant", "first")),
            {"0.jpg": jpeg(COLORS["red"]), "2.jpg": jpeg(COLORS["red"])},
            r"image 1 \(key.1.jpg / ...\) is missing but later images"),
    "twice": (turns(("user", "<|image|>What?"), ("assistant", "red")), {"jpg": jpeg(COLORS["red"]),
              "0.png": jpeg(COLORS["red"])}, r"members \['0.png', 'jpg'\] are all image 0"),
    "order": (turns(("assistant", "hi"), ("user", "What?")), None,
              r"conversations\[0\].role is 'assistant' where 'user' belongs"),
    "twousers": (turns(("user", "What?"), ("user", "What?"), ("assistant", "red")), None,
                 r"conversations\[1\].role is 'user' where 'assistant' belongs"),
    "latesystem": (turns(("user", "What?"), ("assistant", "red"), ("system", "Be brief.")), None,
                   r"conversations\[2\].role is 'system' where 'user' belongs"),
    "noanswer": (turns(("system", "Be brief."), ("user", "What?")), None,
                 r"no assistant turn after conversations\[1\]"),
    "empty": (turns(("user", "What?"), ("assistant", "  ")), None, r"conversations\[1\].content: an empty assistant"),
    "role": (turns(("human", "What?"), ("assistant", "red")), None, r"conversations\[0\].role 'human' is not one of"),
    "content": ([{"role": "user", "content": ["What?"]}, {"role": "assistant", "content": "red"}], None,
                r"conversations\[0\].content is a list, not a string"),
    "nocontent": ([{"role": "user", "content": "What?"}, {"role": "assistant"}], None,
                  r"conversations\[1\].content is missing"),
    "imageinanswer": (turns(("user", "<|image|>What?"), ("assistant", "<|image|>red")), {"jpg": jpeg(COLORS["red"])},
                      r"conversations\[1\].content: <\|image\|> in the assistant turn"),
    "none": ([], None, r"has no 'conversations' list"),
}


def test_bad_conversations_are_named_by_shard_key_and_field_or_counted(tok, tmp_path):
    shard = write(tmp_path / "bad_00000.tar", [sample("good", TEXT_ONLY)] + [
        sample(key, conversation, images) for key, (conversation, images, _) in BAD.items()])
    codec = ImageConversationCodec(tok, TILING)
    found = raws(shard)
    for key, (_, _, message) in BAD.items():
        with pytest.raises(BadSampleError, match=rf"bad_00000.tar: sample {key}(\.json)?:? .*{message}"):
            codec.decode(found[key])
    batches = TrainBatches(ShardStream([shard], shuffle_buffer=1), codec, tok.pad_id, 64, 64, 1, on_error="count")
    assert next(batches).keys == [f"{shard}:good"]
    next(batches)  # the next epoch's good sample: every bad one was counted on the way
    assert batches.bad == {str(shard): list(BAD)}


def test_pipeline_runs_refuse_the_conversation_format():
    with pytest.raises(TrainConfigError, match="data.format: conversation samples hold any number of images"):
        load_run_config(None, ["kind=image", "data.format=conversation", "parallel=pipeline"])


def conversation_run(tok, tmp_path: Path, steps: int):
    """A tiny image run on ``tmp_path/conv_0000{0,1}.tar`` with data.format conversation."""
    (tmp_path / "tokenizer.model").write_bytes(Path(tok.path).read_bytes())
    return load_run_config(Path("configs/run_image_qa_synthetic.yaml"), [
        f"data.shards={tmp_path}/conv_{{00000..00001}}.tar", f"model.tokenizer={tmp_path}/tokenizer.model",
        "model.lm=null", "model.encoder_from=null", "data.format=conversation", "data.max_seq_len=128",
        "data.max_rows=3", "data.shuffle_buffer=4", f"train.steps={steps}", "optim.warmup=1",
        f"train.run_dir={tmp_path}/run", "train.progress=false", "train.save_every=100"])


def test_a_tiny_image_run_on_conversations_trains(tok, tmp_path):
    def conversation(i: int) -> dict:
        first, second = list(COLORS)[i % 4], list(COLORS)[(i + 1) % 4]
        if i % 3 == 2:
            return sample(f"t{i:03d}", TEXT_ONLY)
        chat = turns(("user", COMPARE), ("assistant", "first" if first == "red" else "second"),
                     ("user", "What color is the other one?"), ("assistant", second))
        return sample(f"c{i:03d}", chat, two_images(first, second))

    for s in range(2):
        write(tmp_path / f"conv_{s:05d}.tar", [conversation(s * 6 + i) for i in range(6)])
    result = train(conversation_run(tok, tmp_path, steps=3))
    assert sorted(result.losses) == [1, 2, 3], result.losses
    assert all(torch.isfinite(torch.tensor(list(result.losses.values())))), result.losses
    assert (result.export_dir / "config.json").is_file()


def test_micro_batches_of_text_only_conversations_train_too(tok, tmp_path):
    """No image in a micro-batch: only the frozen LM makes the loss; the task ties it to the trainable weights
    with zero gradients, so the engine's backward and step run as for any batch (and the adapter is unchanged
    by the batch's gradient: weight decay is 0 in this config)."""
    for s in range(2):
        write(tmp_path / f"conv_{s:05d}.tar", [sample(f"t{s}{i}", TEXT_ONLY) for i in range(4)])
    result = train(conversation_run(tok, tmp_path, steps=2))
    assert sorted(result.losses) == [1, 2] and all(torch.isfinite(torch.tensor(list(result.losses.values()))))


def mp4(shift: int = 0) -> bytes:
    """8 frames of a moving bar, MPEG-4 part 2 (built into PyAV's FFmpeg)."""
    import io

    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(8):
            frame = np.zeros((32, 32, 3), np.uint8)
            frame[:, (4 * i + shift) % 24 : (4 * i + shift) % 24 + 8] = 255
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def test_video_conversations_put_each_video_where_its_placeholder_is(tok, tmp_path):
    from adapters.chat import video_input_id
    from training.codecs import VideoConversationCodec
    from tests.tiny import tiny_video_config
    from adapters.multimodal import build_multimodal

    ask = "Does the bar in <|video|> move like the one in <|video|>?"
    chat = turns(("user", ask), ("assistant", "first"), ("user", "What color is the other one?"), ("assistant", "blue"))
    shard = write(tmp_path / "vid_00000.tar", [
        sample("two", chat, {"0.mp4": mp4(), "1.mp4": mp4(8)}), sample("text", TEXT_ONLY),
        sample("toofew", turns(("user", ask), ("assistant", "first")), {"mp4": mp4()}),
        sample("image", turns(("user", "<|image|>What?"), ("assistant", "red")), {"jpg": jpeg(COLORS["red"])})])
    codec = VideoConversationCodec(tok, tile_size=56, num_frames=4)
    found = raws(shard)
    ex = codec.decode(found["two"])
    vid = video_input_id(tok)
    assert ex.tokens.count(vid) == 2 and len(ex.media) == 2 and ex.media[0].num_frames == 4
    a, b, rest = ask.split("<|video|>")
    body = tok.encode(a) + [vid] + tok.encode(b) + [vid] + tok.encode(rest)
    assert any(ex.tokens[i : i + len(body)] == body for i in range(len(ex.tokens)))
    assert labelled(ex) == tok.encode("first") + [tok.eot_id] + tok.encode("blue") + [tok.eot_id]
    with pytest.raises(BadSampleError, match=r"2 <\|video\|> placeholder\(s\) but the sample has 1 video"):
        codec.decode(found["toofew"])
    with pytest.raises(BadSampleError, match=r"a <\|image\|> placeholder in a video conversation"):
        codec.decode(found["image"])
    text = codec.decode(found["text"])
    assert codec.collate([text]) == {}  # an all-text micro-batch: no video tensors, the task ties the loss
    batch = codec.collate([ex, text])["videos"]
    assert batch.video_mask.tolist() == [[True, True], [False, False]]
    model = build_multimodal(tiny_video_config(tok, num_frames=4))
    mb = TrainBatches(ShardStream([shard], shuffle_buffer=1), codec, tok.pad_id, 128, 1024, 2, on_error="count")
    first = next(mb)
    out = ImageTextTask(model)(first.tokens, first.labels, **first.media)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and first.media["videos"].video_mask.any()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("video.") and p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)  # the videos reach the loss through the video adapter
    assert load_run_config(None, ["kind=video", "data.format=conversation"]).data.format == "conversation"
