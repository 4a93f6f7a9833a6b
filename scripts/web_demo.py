"""Chat with an export in the browser (gradio): images, videos or audio as the checkpoint takes them.

    python -m scripts.web_demo --checkpoint EXPORT [--lm DIR] [--tokenizer tokenizer.model] [--host 127.0.0.1]
        [--port 7860] [--max-upload-mb 50] [--frames N] [--max-new-tokens 64] [--temperature 0] [--top-p 0.9]

--checkpoint:    our export (config.json + model.safetensors + tokenizer.model): an image model (a video adapter
                 adds video uploads) or a speech model (audio uploads). --lm, --tokenizer as in scripts.demo_vqa.
--max-upload-mb: a larger upload is refused (by the server before it is stored, and again before it is read).
--frames:        frames sampled from each uploaded video (default: the checkpoint's video.max_frames).
--max-new-tokens, --temperature, --top-p: the settings' starting values (the page has sliders for them).

Image / video models: multi-turn chat. Every turn so far goes into the prompt in the Llama 3 chat format
(`adapters.chat.encode_dialog`), each upload as a media token before its turn's text, the chat's images and
videos given to the model in that order; the answer streams token by token. Speech models answer each turn's audio
with its transcript (the page's task "asr") or translation ("ast"), as scripts.demo_asr does (greedy); earlier
turns are not part of that prompt.

Bad input is one visible message and the server keeps serving: a file that is not an image / video / audio the
checkpoint takes, or a chat that no longer fits the model's context, is an error line in the chat and a warning; a
file over --max-upload-mb is refused by gradio's upload with its own error notice.
No request leaves the machine: gradio's analytics are off and the page uses system fonts.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.chat import Message
from adapters.checkpoint import CheckpointError
from adapters.model_io import load_checkpoint
from adapters.generation import GenerationLengthError
from adapters.multimodal import ImageBatch
from adapters.tokenizer import Tokenizer, TokenizerError
from adapters.video_adapter import VideoBatch
from common.export import ExportFormatError
from media.audio import MAX_SECONDS, SAMPLE_RATE, Audio, AudioReadError, chunk_audio, load_audio
from media.image import ImageLoadError
from media.video import VideoReader, VideoReadError
from scripts.demo_asr import PROMPTS, load_speech_model, max_piece_samples, transcript
from scripts.demo_video import StillImageError, read_clip, video_model_problem
from scripts.demo_vqa import (add_sampling_args, answer_pieces, find_tokenizer, modality_error, number,
                              positive_int, tiled_image)
from speech.adapter import encode_speech_dialog
from vision.frames import collate_videos, tile_frames, video_tiling
from vision.tiling import TilingError, collate_tiled

MB = 2**20
ARTICLE = {"image": "an image", "video": "a video", "audio": "audio"}
EMPTY = {"text": "", "files": []}  # the message box, cleared (None would keep its files)


class UploadError(ValueError):
    """An upload the demo cannot use: too large, or not a medium the checkpoint takes."""


@dataclass
class Media:
    kind: str  # "image" | "video" | "audio"
    name: str
    data: Any  # TiledImage | TiledVideo | Audio


@dataclass
class Turn:
    role: str  # "user" | "assistant"
    text: str
    media: list[Media] = field(default_factory=list)


def conversation(turns: list[Turn]) -> list[Message]:
    """The chat as `Message`s: each turn's uploads are media tokens before its text (videos, then images)."""
    return [Message(t.role, t.text, n_images=sum(m.kind == "image" for m in t.media),
                    n_videos=sum(m.kind == "video" for m in t.media)) for t in turns]


def check_size(path: str | Path, max_bytes: int) -> None:
    """`UploadError` when the file at ``path`` is larger than ``max_bytes``."""
    size = os.path.getsize(path)
    if size > max_bytes:
        raise UploadError(f"{Path(path).name}: {size / MB:.1f} MB is over the upload limit of "
                          f"{max_bytes / MB:.3g} MB (--max-upload-mb)")


def read_media(path: str | Path, readers: dict[str, Any], max_bytes: int) -> Media:
    """The upload at ``path`` read by the first of ``readers`` (kind -> path -> data) that can; `UploadError` when it
    is too large or none can, naming the file (not its server-side path) and the first reader's reason."""
    check_size(path, max_bytes)
    name, reasons = Path(path).name, []
    for kind, read in readers.items():
        try:
            return Media(kind, name, read(path))
        except (ImageLoadError, TilingError, VideoReadError, StillImageError, AudioReadError) as e:
            reasons.append(str(e).replace(str(path), name))
    kinds = " or ".join(ARTICLE[k] for k in readers)
    raise UploadError(f"{name}: not {kinds} this checkpoint can read ({reasons[0]})")


class ChatModel:
    """An export and what the page needs of it: the media it takes, how to read them, how to answer a chat."""

    def __init__(self, args: argparse.Namespace):
        path = Path(args.checkpoint)
        try:
            self.model, self.speech = load_checkpoint(path, lm_path=args.lm).eval(), False
        except ExportFormatError as e:
            if e.found_kind != "speech":
                raise modality_error(e, path, "image, video or speech") from None
            self.model, self.speech = load_speech_model(path), True
        self.tok = Tokenizer(find_tokenizer(path, args.tokenizer))
        self.defaults, self.max_bytes = args, round(args.max_upload_mb * MB)
        if self.speech:
            self.readers: dict[str, Any] = {"audio": lambda p: load_audio(p, max_seconds=None)}
            self.max_seq_len = self.model.cfg.seq_limit
            return
        self.readers = {"image": lambda p: tiled_image(self.model, p)}
        self.max_seq_len = self.model.cfg.lm.max_seq_len
        if self.model.cfg.video is not None:
            frames = args.frames or self.model.cfg.video.max_frames
            if problem := video_model_problem(self.model.cfg, path, frames):
                raise CheckpointError(problem)
            reader, tiling = VideoReader(), video_tiling(self.model.cfg.vision.tile_size)
            self.readers["video"] = lambda p: tile_frames(read_clip(reader, p, frames), tiling)

    def describe(self) -> str:
        if self.speech:
            return "a speech model: attach an audio clip to each message; it answers with the transcript"
        return f"an {' / '.join(self.readers)} chat model: attach files to a message, or ask in text only"

    def answer(self, turns: list[Turn], settings: argparse.Namespace, task: str, language: str) -> Iterator[str]:
        """The answer to the chat's last (user) turn as text pieces; `UploadError` / `GenerationLengthError` before
        any decoding when it cannot be answered."""
        if self.speech:
            return self.transcribe(turns[-1], settings.max_new_tokens, task, language)
        media = [m for t in turns for m in t.media]
        images = [m.data for m in media if m.kind == "image"]
        videos = [m.data for m in media if m.kind == "video"]
        return answer_pieces(
            self.model, self.tok, conversation(turns), settings,
            images=ImageBatch.from_collated(collate_tiled([images])).trimmed() if images else None,
            videos=VideoBatch.from_collated(collate_videos([videos])).trimmed() if videos else None)

    def transcribe(self, turn: Turn, max_new_tokens: int, task: str, language: str) -> Iterator[str]:
        """demo_asr's answer to the turn's audio: every clip cut into pieces that fit the context, transcribed."""
        if not turn.media:
            raise UploadError("a speech model answers about audio: attach a clip to the message")
        prompt = encode_speech_dialog(self.tok, PROMPTS[task](language.strip() or "English"))
        piece = max_piece_samples(self.model.cfg, len(prompt), max_new_tokens, round(MAX_SECONDS * SAMPLE_RATE))
        if piece < 1:
            raise GenerationLengthError(f"max new tokens {max_new_tokens} leaves no room for audio: the checkpoint "
                                        f"holds {self.max_seq_len} positions and the prompt takes {len(prompt)}")
        pieces: list[Audio] = [p for m in turn.media for p in chunk_audio(m.data, piece / SAMPLE_RATE)]
        return transcript(self.model, self.tok, prompt, pieces, max_new_tokens)

    def respond(self, message: dict | None, history: list[dict], turns: list[Turn], max_new_tokens: float,
                temperature: float, top_p: float, top_k: float, task: str, language: str):
        """The gradio callback: yields (chat shown, turns, input box) as the answer grows. A refused message
        leaves the turns as they were and shows one error line (and a warning)."""
        import gradio as gr

        text, files = (message or {}).get("text", "").strip(), (message or {}).get("files", [])
        if not text and not files:
            yield history, turns, EMPTY
            return
        names = "".join(f"[{Path(f).name}] " for f in files)
        shown = [*history, {"role": "user", "content": names + text}]
        settings = argparse.Namespace(**{**vars(self.defaults), "max_new_tokens": int(max_new_tokens),
                                         "temperature": float(temperature), "top_p": float(top_p),
                                         "top_k": int(top_k)})
        try:
            asked = [*turns, Turn("user", text, [read_media(f, self.readers, self.max_bytes) for f in files])]
            pieces = self.answer(asked, settings, task, language)
        except ValueError as e:  # UploadError, GenerationLengthError, unreadable media, sampling values
            error = f"{e}; New chat starts over" if isinstance(e, GenerationLengthError) else str(e)
            gr.Warning(error)
            yield [*shown, {"role": "assistant", "content": f"Error: {error}"}], turns, EMPTY
            return
        answer = ""
        yield [*shown, {"role": "assistant", "content": answer}], turns, EMPTY
        for piece in pieces:
            answer += piece
            yield [*shown, {"role": "assistant", "content": answer}], turns, EMPTY
        yield [*shown, {"role": "assistant", "content": answer}], [*asked, Turn("assistant", answer)], EMPTY


def build_page(chat: ChatModel, title: str):
    """The gradio page: the chat, a message box that takes the checkpoint's media, the settings, New chat."""
    import gradio as gr

    d = chat.defaults
    with gr.Blocks(title="llama3-mm web demo") as page:
        gr.Markdown(f"### {title}\n{chat.describe()}.")
        shown = gr.Chatbot(elem_id="chat", show_label=False, height=420, render_markdown=False,
                           feedback_options=None)
        box = gr.MultimodalTextbox(elem_id="ask", show_label=False, file_types=list(chat.readers),
                                   file_count="multiple", placeholder="Ask a question, attach files", autofocus=True)
        with gr.Row():
            max_new = gr.Slider(1, chat.max_seq_len, value=min(d.max_new_tokens, chat.max_seq_len), step=1,
                                label="max new tokens")
            temperature = gr.Slider(0, 2, value=d.temperature, step=0.05, label="temperature (0 = greedy)",
                                    visible=not chat.speech)
            top_p = gr.Slider(0.05, 1, value=d.top_p, step=0.05, label="top-p", visible=not chat.speech)
            top_k = gr.Slider(0, 200, value=d.top_k, step=1, label="top-k (0 = off)", visible=not chat.speech)
            task = gr.Radio(sorted(PROMPTS), value="asr", label="task", visible=chat.speech)
            language = gr.Textbox("English", label="language", visible=chat.speech)
        new_chat = gr.Button("New chat")
        turns = gr.State([])
        box.submit(chat.respond, [box, shown, turns, max_new, temperature, top_p, top_k, task, language],
                   [shown, turns, box])
        new_chat.click(lambda: ([], [], EMPTY), None, [shown, turns, box])
    return page


def positive_mb(text: str) -> float:
    """argparse type: a size in MB, > 0."""
    return number(text, lambda v: v > 0, "> 0", "a number of MB")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="our export (image, video or speech model)")
    p.add_argument("--lm", default=None, help="the frozen LM of an export without it")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-upload-mb", type=positive_mb, default=50.0)
    p.add_argument("--frames", type=positive_int, default=None, help="frames per video (default: max_frames)")
    add_sampling_args(p)
    args = p.parse_args(argv)
    try:
        chat = ChatModel(args)
    except (CheckpointError, TokenizerError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported
    import gradio as gr

    # System fonts: the default theme would fetch its fonts from the internet.
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    build_page(chat, str(args.checkpoint)).queue().launch(
        server_name=args.host, server_port=args.port, max_file_size=round(args.max_upload_mb * MB), theme=theme,
        ssr_mode=False, share=False, show_error=False, footer_links=[])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
