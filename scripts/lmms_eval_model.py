"""Our image / video export as an lmms-eval 0.7.3 model, ``llama3_mm``:

    lmms-eval --model llama3_mm --model_args checkpoint=EXPORT[,lm=DIR][,frames=N][,device=cuda][,dtype=bfloat16]
        --tasks T [--include_path DIR_OF_TASK_YAMLS] [--batch_size 8] --output_path OUT --log_samples
    (``python -m lmms_eval`` takes the same flags; ``mllama=DIR`` instead of ``checkpoint=`` reads a Hugging Face
    Mllama or Meta Llama 3.2 Vision directory, as scripts.demo_vqa --mllama does; ``tokenizer=`` as its --tokenizer)

lmms-eval finds the model through the ``lmms_eval.models`` entry point in pyproject.toml (`manifest`: 0.7.3's
model registry reads that group on import; its ``register_model`` decorator alone is not consulted by
``--model``), so the project must be pip-installed (``pip install -e '.[eval]'``; ``make test`` does it). Python
reads a ``llama3_mm.egg-info`` in the current directory before the installed metadata: a stale one there (left by
an old setuptools run, without entry_points.txt) hides the model: run from another directory, or refresh it with
``python -c "from setuptools import setup; setup()" egg_info``.

Requests as lmms-eval builds them for simple models:
- generate_until: doc_to_visual's PIL images and video paths go before the text (our chat format, one
  ``<|image|>`` / ``<|video|>`` per item; a literal "<image>" in the text is dropped), greedy unless
  ``temperature`` > 0 (``do_sample: false`` forces greedy; ``num_beams`` > 1 is refused), ``max_new_tokens``
  (default 64), the answer cut at the first ``until`` string. Requests are decoded ``batch_size`` at a time,
  grouped by sampling settings, prompt length and tile counts, so no row sees padding it would not see alone:
  the answers are scripts.evaluate's (and the demos') for the same export and prompt.
- loglikelihood: (-sum of the continuation's token log-probs given the context and visuals, is_greedy). The
  sign is lmms-eval's: every consumer of these scores in 0.7.3 (``multiple_choice`` tasks' ``acc`` and
  ``acc_norm``, the ``*_mcppl`` tasks) takes the smallest as the model's choice, as its built-in models return
  a loss. The continuation is the assistant's reply after the prompt's assistant header (no end of turn).
- generate_until_multi_round: round 0 is the request's context; each later round asks doc_to_text (with
  ``round_idx``, ``previous_output``, ``previous_round_info``, as lmms-eval's own models do) for the next
  (visuals, text, terminal, ...), each round a single-turn request; the reply is the list of round answers.
"""

from __future__ import annotations

import itertools
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from lmms_eval.api.registry import register_model
from PIL import Image

from adapters.chat import Message, encode_dialog
from adapters.checkpoint import CheckpointError
from adapters.generation import SamplingConfig, check_length, collect_ids, generate, stream_text
from adapters.multimodal import ImageBatch, MultimodalLlama
from adapters.tokenizer import Tokenizer
from adapters.video_adapter import VideoBatch
from media.image import to_rgb
from media.video import VideoReader
from scripts.demo_video import read_clip, video_model_problem
from scripts.demo_vqa import find_tokenizer, load_export
from vision.frames import TiledVideo, collate_videos, tile_frames, video_tiling
from vision.tiling import TiledImage, TilingConfig, collate_tiled, tile_image

MODEL_NAME = "llama3_mm"
DEFAULT_MAX_NEW_TOKENS = 64
IGNORED_GEN_KWARGS = ("use_cache", "image_aspect_ratio", "max_length")  # HF-generate knobs with no effect here
log = logging.getLogger(__name__)


def manifest():
    """The ``lmms_eval.models`` entry point (pyproject.toml): ``--model llama3_mm`` resolves to `Llama3MM`. Its
    import waits for the call: importing lmms_eval.models runs the registry, which loads this module."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.Llama3MM")


@dataclass
class Query:
    """One single-turn request: the user text, its tiled images and videos, and the prompt ids."""

    prompt: list[int]
    images: list[TiledImage]
    videos: list[TiledVideo]

    def shape_key(self) -> tuple:
        """Rows with equal keys batch without padding: prompt length, and the tiles of every image / frame."""
        tiles = tuple(int(m.tile_mask.sum(-1).max()) for m in (*self.images, *self.videos))
        return len(self.prompt), len(self.images), len(self.videos), tiles


def sampling_config(gen_kwargs: dict) -> tuple[SamplingConfig, list[str]]:
    """lmms-eval's generation_kwargs -> (our sampling settings, the ``until`` stop strings)."""
    kwargs = dict(gen_kwargs)
    until = kwargs.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    if int(kwargs.pop("num_beams", 1) or 1) != 1:
        raise ValueError(f"{MODEL_NAME}: num_beams > 1 (beam search) is not supported, got {gen_kwargs['num_beams']}")
    temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
    if not kwargs.pop("do_sample", temperature > 0):
        temperature = 0.0
    top_p = kwargs.pop("top_p", None)
    sampling = SamplingConfig(max_new_tokens=int(kwargs.pop("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)),
                              temperature=temperature, top_p=1.0 if top_p is None else float(top_p),
                              seed=kwargs.pop("seed", None))
    if unknown := sorted(set(kwargs) - set(IGNORED_GEN_KWARGS)):
        log.warning("%s ignores generation_kwargs %s", MODEL_NAME, unknown)
    return sampling, until


def cut_at_stops(text: str, until: list[str]) -> str:
    """``text`` up to the first occurrence of any non-empty ``until`` string."""
    cut = min((text.index(s) for s in until if s and s in text), default=len(text))
    return text[:cut]


@register_model(MODEL_NAME)
class Llama3MM(lmms):
    """``checkpoint``: our image/video export (``lm``: its frozen LM when the export does not hold it), or
    ``mllama``: a HF / Meta Llama 3.2 Vision directory (images keep every tile slot, as those were trained).
    ``frames``: frames per video (default the export's video.max_frames)."""

    def __init__(self, checkpoint: str | None = None, mllama: str | None = None, lm: str | None = None,
                 tokenizer: str | None = None, frames: int | None = None, batch_size: int | str = 1,
                 device: str | None = None, dtype: str | None = None, max_batch_size: int | None = None,
                 **unknown) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"{MODEL_NAME}: unknown model_args {sorted(unknown)} (takes checkpoint, mllama, lm, "
                             f"tokenizer, frames, device, dtype)")
        if (checkpoint is None) == (mllama is None):
            raise ValueError(f"{MODEL_NAME}: give exactly one of checkpoint= (our export) or mllama= (HF / Meta)")
        if lm is not None and checkpoint is None:
            raise ValueError(f"{MODEL_NAME}: lm= goes with checkpoint= (an HF or Meta directory holds its LM)")
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"{MODEL_NAME}: batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model_dir = Path(checkpoint or mllama)
        if checkpoint is not None:
            model = load_export(model_dir, lm)
        else:
            from adapters.model_io import load_multimodal_checkpoint

            model = load_multimodal_checkpoint(model_dir).eval()
        model = model.to(self.device)
        self.model: MultimodalLlama = model if dtype is None else model.to(getattr(torch, dtype))
        self.tok = Tokenizer(find_tokenizer(model_dir, tokenizer))
        self.padded = mllama is not None
        vcfg = self.model.cfg.vision
        self.tiling = TilingConfig(tile_size=vcfg.tile_size, max_tiles=vcfg.max_tiles)
        self.frames = frames
        if frames is not None and (problem := video_model_problem(self.model.cfg, model_dir, int(frames))):
            raise CheckpointError(problem)
        self.model_dir = model_dir
        self.reader = VideoReader()

    # ------------------------------------------------------------------------------------------ inputs

    def query(self, text: str, visuals: list | None, add_generation_prompt: bool = True) -> Query:
        """The prompt of one user turn with ``visuals`` (PIL images; video paths) before ``text``."""
        images, videos = [], []
        for v in visuals or []:
            if isinstance(v, Image.Image):
                images.append(tile_image(to_rgb(v), self.tiling))
            elif isinstance(v, (str, Path)):
                videos.append(self.tiled_video(v))
            else:
                raise TypeError(f"{MODEL_NAME}: doc_to_visual gave a {type(v).__name__}; expected PIL images "
                                f"or video paths")
        message = Message("user", text.replace("<image>", ""), n_images=len(images), n_videos=len(videos))
        return Query(encode_dialog(self.tok, [message], add_generation_prompt), images, videos)

    def tiled_video(self, path: str | Path) -> TiledVideo:
        cfg = self.model.cfg
        frames = int(self.frames or (cfg.video.max_frames if cfg.video is not None else 1))
        if problem := video_model_problem(cfg, self.model_dir, frames):
            raise CheckpointError(problem)
        return tile_frames(read_clip(self.reader, path, frames), video_tiling(cfg.vision.tile_size))

    def media(self, queries: list[Query]) -> tuple[ImageBatch | None, VideoBatch | None]:
        """The images and videos of rows with one `Query.shape_key`, collated for the model."""
        images = videos = None
        if queries[0].images:
            images = ImageBatch.from_collated(collate_tiled([q.images for q in queries]))
            images = (images if self.padded else images.trimmed()).to(self.device)
        if queries[0].videos:
            videos = VideoBatch.from_collated(collate_videos([q.videos for q in queries])).trimmed().to(self.device)
        return images, videos

    def visuals(self, request: Instance) -> list:
        """doc_to_visual of the request's document, flattened (none for a bare (context, continuation) request)."""
        if len(request.args) < 6:  # multiple_choice's unconditional ("", choice) requests (acc_mutual_info)
            return []
        doc_to_visual, doc_id, task, split = request.args[2], request.args[-3], request.args[-2], request.args[-1]
        return flatten(doc_to_visual(self.task_dict[task][split][doc_id]))

    # ------------------------------------------------------------------------------------------ requests

    def answer(self, queries: list[Query], sampling: SamplingConfig, until: list[str]) -> list[str]:
        """Answers of ``queries`` under one sampling setting, ``batch_size`` rows of one shape per decode."""
        for q in queries:
            check_length(len(q.prompt), sampling.max_new_tokens, self.model.cfg.lm.max_seq_len)
        out = [""] * len(queries)
        for idx in batches(queries, Query.shape_key, self.batch_size):
            group = [queries[i] for i in idx]
            images, videos = self.media(group)
            prompt = torch.tensor([q.prompt for q in group], device=self.device)
            steps = generate(self.model, prompt, images, sampling, self.tok.stop_ids, videos=videos)
            for i, ids in zip(idx, collect_ids(steps, self.tok.stop_ids)):
                out[i] = cut_at_stops("".join(stream_text(self.tok, ids, self.tok.stop_ids)), until)
        return out

    def generate_until(self, requests: list[Instance]) -> list[str]:
        by_kwargs: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            by_kwargs[repr(sorted(r.args[1].items()))].append(i)
        out = [""] * len(requests)
        for idx in by_kwargs.values():
            sampling, until = sampling_config(requests[idx[0]].args[1])
            queries = [self.query(requests[i].args[0], self.visuals(requests[i])) for i in idx]
            for i, text in zip(idx, self.answer(queries, sampling, until)):
                out[i] = text
        return out

    @torch.inference_mode()
    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """(score, is_greedy) per request, each wrapped in a ``GenerationResult``: 0.7.3's evaluator passes every
        reply through ``unwrap_generation_output``, which turns a bare (float, bool) tuple into its str() (and
        multiple_choice then fails to unpack it); a GenerationResult's ``text`` comes through as it is."""
        rows = []
        for r in requests:
            context, target = r.args[0], r.args[1]
            if callable(target):
                doc_id, task, split = r.args[-3:]
                target = target(self.task_dict[task][split][doc_id])
            q = self.query(context, self.visuals(r))
            cont = self.tok.encode(str(target))
            if not cont:
                raise ValueError(f"{MODEL_NAME}: loglikelihood of an empty continuation ({target!r})")
            rows.append((Query(q.prompt + cont, q.images, q.videos), len(cont)))
        out: list[GenerationResult] = [GenerationResult("")] * len(rows)
        for idx in batches([q for q, _ in rows], Query.shape_key, self.batch_size):
            group = [rows[i][0] for i in idx]
            if len(group[0].prompt) > self.model.cfg.lm.max_seq_len:
                raise ValueError(f"{MODEL_NAME}: context and continuation take {len(group[0].prompt)} tokens, "
                                 f"more than max_seq_len ({self.model.cfg.lm.max_seq_len})")
            images, videos = self.media(group)
            tokens = torch.tensor([q.prompt for q in group], device=self.device)
            logprobs = torch.log_softmax(self.model(tokens, images, videos).float(), dim=-1)
            for b, i in enumerate(idx):
                n = rows[i][1]
                target_ids = tokens[b, -n:]
                pred = logprobs[b, -n - 1 : -1]
                ll = pred.gather(-1, target_ids[:, None]).sum()
                out[i] = GenerationResult((-float(ll), bool((pred.argmax(-1) == target_ids).all())))
        return out

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        out = []
        for r in requests:
            context, gen_kwargs, _, doc_to_text, doc_id, task, split = r.args
            sampling, until = sampling_config(gen_kwargs)
            doc = self.task_dict[task][split][doc_id]
            visuals, text, answers, info = self.visuals(r), context, [], None
            for round_idx in itertools.count(1):
                answers.append(self.answer([self.query(text, visuals)], sampling, until)[0])
                visuals, text, terminal, previous, info = doc_to_text(
                    doc, previous_output=list(answers), round_idx=round_idx, previous_round_info=info)
                if terminal:
                    break
                answers = list(previous)
            out.append(answers)
        return out


def flatten(visuals) -> list:
    """doc_to_visual's result as one flat list (tasks return a list, a list of lists, or None)."""
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        return [visuals]
    return [v for item in visuals for v in flatten(item)]


def batches(items: list, key: Callable, size: int) -> list[list[int]]:
    """Indices of ``items`` with equal ``key``, in chunks of at most ``size``."""
    groups: dict = defaultdict(list)
    for i, item in enumerate(items):
        groups[key(item)].append(i)
    return [idx[s : s + size] for idx in groups.values() for s in range(0, len(idx), size)]
