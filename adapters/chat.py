"""Llama 3 chat format with images in the user turn (Llama 3.2 Vision prompt format).

    <|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n<|image|>Question<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n

``<|image|>`` is emitted as the *model* id (``tokenizer.n_words``, i.e. 128256 for Llama 3, the first
learnable embedding row), as Meta's ChatFormat rewrites 128011 before the model sees it. A video is
``<|video|>``, the next row (``n_words + 1``); no released prompt format has one, so ours puts it where
images go, before the question.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from adapters.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "ipython")
IGNORE_INDEX = -100  # the label of a position that is not a target (prompt, media, padding); the loss skips it

# Rows of the learnable embedding (model ids ``vocab_size + row``), one per media placeholder token; the one
# definition the image, video and speech models and their chat encoders share.
IMAGE_TOKEN_ROW = 0  # <|image|>: 128256 for Llama 3, as released
VIDEO_TOKEN_ROW = 1  # <|video|>
AUDIO_TOKEN_ROW = 2  # <|audio|> (`speech.adapter.audio_input_id`)


@dataclass
class Message:
    role: str
    content: str
    n_images: int = 0  # images placed before the text, as in the released prompt format
    n_videos: int = 0  # <|video|> tokens, placed before the images and the text
    images: list = field(default_factory=list)  # optional payload (paths / PIL images), not tokenised

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"Message.role must be one of {ROLES}, got {self.role!r}")


def image_input_id(tok: Tokenizer) -> int:
    return tok.n_words + IMAGE_TOKEN_ROW


def video_input_id(tok: Tokenizer) -> int:
    return tok.n_words + VIDEO_TOKEN_ROW


def encode_header(tok: Tokenizer, role: str) -> list[int]:
    return [tok.start_header_id, *tok.encode(role), tok.end_header_id, *tok.encode("\n\n")]


def encode_message(tok: Tokenizer, msg: Message) -> list[int]:
    n_images = max(msg.n_images, len(msg.images))
    return [
        *encode_header(tok, msg.role),
        *([video_input_id(tok)] * msg.n_videos),
        *([image_input_id(tok)] * n_images),
        *tok.encode(msg.content.strip()),
        tok.eot_id,
    ]


def encode_dialog(tok: Tokenizer, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
    """Prompt ids: BOS, each message, then the assistant header that the model completes."""
    ids = [tok.bos_id]
    for m in messages:
        ids += encode_message(tok, m)
    if add_generation_prompt:
        ids += encode_header(tok, "assistant")
    return ids


def encode_training_example(tok: Tokenizer, messages: list[Message]) -> tuple[list[int], list[int]]:
    """(tokens, labels) for SFT/caption training: only assistant turns (their text and eot) are labelled."""
    tokens, labels = [tok.bos_id], [IGNORE_INDEX]
    for m in messages:
        ids = encode_message(tok, m)
        tokens += ids
        if m.role == "assistant":
            header = len(encode_header(tok, "assistant"))
            labels += [IGNORE_INDEX] * header + ids[header:]
        else:
            labels += [IGNORE_INDEX] * len(ids)
    return tokens, labels
