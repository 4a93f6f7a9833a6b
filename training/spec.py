"""Per-kind training specs (torchtitan's ``TrainSpec``): what differs between the kinds the trainer runs.

A `TrainSpec` names, for one ``kind``, the model factory, the task (model + loss, the module the DeepSpeed
engine wraps), the sample codec (shard sample -> tokens, labels, media), the optimizer's parameter groups
and the export writer, plus which data formats and parallel layouts the kind supports. `training.trainer`
looks the kind up once (`get_spec`) and runs the same loop for all of them; `training.config` checks a run
config against the spec (formats, packing, tensor / pipeline parallelism), so adding a kind is one entry
in `SPECS` and no ``if kind ==`` anywhere else.

Kinds: ``image`` / ``video`` (the multimodal adapters, `adapters.model_io` exports), ``speech`` (the speech
adapter, `speech.model_io` exports), ``text`` (pre-training the LM alone, `training.text_lm`; its export is a
Meta-layout Llama that the other kinds take as ``model.lm``) and ``clip`` (contrastive pre-training of the
vision encoder, `training.clip`; its export is what the image kind's ``model.encoder_from`` starts from).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from training.bestrq import bestrq_spec
from training.preference import dpo_spec, reward_spec

if TYPE_CHECKING:
    from adapters.multimodal import MultimodalConfig
    from adapters.tokenizer import Tokenizer
    from training.config import RunConfig
    from training.data import Codec
    from training.loading import RankLayout


class TrainError(RuntimeError):
    """A run that cannot start or go on (a model the spec cannot build, bad resume state, non-finite loss);
    the message says which."""


@dataclass(frozen=True)
class TrainSpec:
    """One kind's pieces. Every callable takes the whole run config (CONVENTIONS 2: passed whole)."""

    name: str
    build_model: Callable[["RunConfig", "Tokenizer | None"], nn.Module]
    build_task: Callable[["RunConfig", nn.Module], nn.Module]  # forward(tokens, labels, **media) -> {"loss", ...}
    build_codec: Callable[["RunConfig", "Tokenizer | None", nn.Module], "Codec"]
    param_groups: Callable[["RunConfig", nn.Module], list[dict]]
    export: Callable[[nn.Module, "RunConfig", Path], Path]  # rank 0, fp32 eval model -> the export dir
    formats: tuple[str, ...]  # data.format values the codec understands
    needs_tokenizer: bool = True  # model.tokenizer (the Llama tokenizer) must be given
    pack_rows: bool = False  # several samples per row (data.pack_rows)
    swap_lm: bool = False  # model.swap_lm: model.init_from's weights around another LM of the same config
    tensor_parallel: bool = False
    pipeline: bool = False
    # Called on the task after every optimizer step with the step number (1-based): DPO's reference refresh.
    after_step: Callable[["RunConfig", nn.Module, int], None] | None = None
    # The model as one rank of a pipeline / tensor-parallel layout holds it (`training.loading`); None: the
    # full build (`build_model`) on every rank.
    build_rank_model: Callable[["RunConfig", "Tokenizer | None", "RankLayout"], nn.Module] | None = None


def get_spec(kind: str) -> TrainSpec:
    if kind not in SPECS:
        raise KeyError(f"kind {kind!r} is not one of {tuple(SPECS)}")
    return SPECS[kind]


def build_data_codec(cfg: "RunConfig", tok: "Tokenizer | None", model: nn.Module) -> "Codec":
    """The run's codec: the kind's for ``data.format``; for a mix (``data.sources``) a `MixCodec` of the kind's
    codec for each source's format. Conversation codecs collate lists of images (videos) per sample: when
    conversation sources mix with caption / chat / qa ones, those collate the batch and the others' single
    image (video) is wrapped in a list, which collates the same."""
    from training.data import MixCodec

    spec = get_spec(cfg.kind)
    if cfg.data.sources is None:
        return spec.build_codec(cfg, tok, model)
    formats = [s.format for s in cfg.data.sources]
    codecs = [spec.build_codec(replace(cfg, data=cfg.data.for_source(i)), tok, model) for i in range(len(formats))]
    if "conversation" in formats and len(set(formats)) > 1:
        return MixCodec(codecs, codecs[formats.index("conversation")], [f != "conversation" for f in formats])
    return MixCodec(codecs, codecs[0])


# ------------------------------------------------------------------------------ image and video


def build_multimodal_model(cfg: "RunConfig", tok: "Tokenizer") -> nn.Module:
    """The image model: from ``model.init_from`` (our export) or a preset around the frozen LM, the encoder
    from ``model.encoder_from`` (a ``clip`` export) when given."""
    from adapters.checkpoint import load_llama
    from adapters.llama import build_llama
    from adapters.model_io import load_checkpoint, read_multimodal_meta
    from adapters.multimodal import build_multimodal
    from training.resolution import with_tile_size

    m = cfg.model
    torch.manual_seed(m.seed)
    if m.init_from:
        # An export that points at its LM finds it through ``model.lm`` when set (the LM moved since, or the
        # run names it anew); the fingerprint check still refuses another LM unless ``model.swap_lm`` (SFT:
        # the instruction-tuned LM of the same config in place of the pre-trained one, sec. 7.5).
        points_at_lm = read_multimodal_meta(m.init_from).get("lm_path")
        lm_path = m.lm if (points_at_lm or m.swap_lm) and m.lm else None
        model = load_checkpoint(m.init_from, lm_path=lm_path, swap_lm=m.swap_lm)
        if m.attn_bias is not None and m.attn_bias != model.cfg.vision.attn_bias:
            raise TrainError(f"model.attn_bias: {m.attn_bias} but model.init_from {m.init_from} was built with "
                             f"vision.attn_bias {model.cfg.vision.attn_bias}; drop the key to keep the export's")
        if m.tile_size is not None:
            model = with_tile_size(model, m.tile_size)  # stage 2: anneal at a higher per-tile resolution
    else:
        mcfg = fresh_multimodal_config(cfg)
        lm = load_llama(m.lm) if m.lm else build_llama(replace(mcfg.lm, vocab_size=tok.n_words))
        model = build_multimodal(replace(mcfg, lm=lm.cfg), lm)
    check_vocab(cfg, tok, model.lm.cfg.vocab_size)
    return model


def fresh_multimodal_config(cfg: "RunConfig") -> "MultimodalConfig":
    """The image model's config from ``model.preset`` and the vision overrides (``cfg.lm`` still the preset's:
    the caller puts the LM's in)."""
    from adapters.multimodal import multimodal_config

    m = cfg.model
    mcfg = multimodal_config(m.preset, train_vision=m.train_vision)
    vision = {k: v for k, v in (("tile_size", m.tile_size), ("max_tiles", m.max_tiles),
                                ("attn_bias", m.attn_bias)) if v is not None}
    if m.encoder_from:
        from training.clip import encoder_weights

        vision["pretrained"] = str(encoder_weights(m.encoder_from, mcfg.vision))
    return replace(mcfg, vision=replace(mcfg.vision, **vision))


def build_video_model(cfg: "RunConfig", tok: "Tokenizer") -> nn.Module:
    """The image model (usually an image export) with a video adapter added when it has none."""
    from adapters.multimodal import build_multimodal
    from adapters.video_adapter import VideoAdapterConfig

    image = build_multimodal_model(cfg, tok)
    if image.video is not None:
        return image
    every = max(1, min(4, image.cfg.n_xattn))  # "before every 4th image cross-attention layer"
    vcfg = replace(image.cfg, video=VideoAdapterConfig(max_frames=cfg.model.num_frames, every=every))
    model = build_multimodal(vcfg, image.lm)
    missing, unexpected = model.load_state_dict(image.state_dict(), strict=False)
    if unexpected or any(not k.startswith("video.") for k in missing):
        raise TrainError(f"{cfg.model.init_from}: image weights do not fit the video model: {missing} {unexpected}")
    return model


def check_vocab(cfg: "RunConfig", tok: "Tokenizer", vocab_size: int) -> None:
    if vocab_size != tok.n_words:
        raise TrainError(f"model.tokenizer {cfg.model.tokenizer} has {tok.n_words} ids, the LM {vocab_size}")


def image_codec(cfg: "RunConfig", tok: "Tokenizer", model: nn.Module) -> "Codec":
    from training.codecs import ImageCaptionCodec, ImageConversationCodec
    from vision.tiling import TilingConfig

    v = model.cfg.vision
    tiling = TilingConfig(tile_size=v.tile_size, max_tiles=v.max_tiles)
    if cfg.data.format == "conversation":  # multi-turn, any number of images per sample (SFT, sec. 7.5)
        return ImageConversationCodec(tok, tiling)
    return ImageCaptionCodec(tok, tiling, cfg.data.format, cfg.data.prompt)


def video_codec(cfg: "RunConfig", tok: "Tokenizer", model: nn.Module) -> "Codec":
    from training.codecs import VideoCaptionCodec, VideoConversationCodec

    if cfg.data.format == "conversation":  # multi-turn, <|video|> placeholders for key.0.mp4, key.1.mp4, ...
        return VideoConversationCodec(tok, model.cfg.vision.tile_size, cfg.model.num_frames)
    return VideoCaptionCodec(tok, model.cfg.vision.tile_size, cfg.model.num_frames, cfg.data.format,
                             cfg.data.prompt)


def image_text_task(cfg: "RunConfig", model: nn.Module) -> nn.Module:
    from adapters.task import ImageTextTask

    return ImageTextTask(model)


def multimodal_param_groups(cfg: "RunConfig", model: nn.Module) -> list[dict]:
    from adapters.task import build_param_groups

    o = cfg.optim
    return build_param_groups(model, o.lr, o.weight_decay, o.encoder_lr_scale)


def export_multimodal(model: nn.Module, cfg: "RunConfig", out: Path) -> Path:
    from adapters.model_io import save_checkpoint

    return save_checkpoint(model, out, tokenizer_path=cfg.model.tokenizer, lm_path=cfg.model.lm)


# ------------------------------------------------------------------------------ speech


def build_speech_model(cfg: "RunConfig", tok: "Tokenizer") -> nn.Module:
    """`SpeechLlama`: from ``model.init_from`` (a speech export; its LM swapped for ``model.lm`` with
    ``model.swap_lm``), else a preset around the frozen LM with the self-supervised encoder of
    ``model.encoder_from`` (sec. 8.1) under a fresh adapter when given."""
    from adapters.checkpoint import load_llama
    from speech.adapter import build_speech_llama, speech_llama_config

    m = cfg.model
    torch.manual_seed(m.seed)
    if m.init_from:
        from adapters.model_io import swapped_lm
        from speech.model_io import load_speech_checkpoint

        model = load_speech_checkpoint(m.init_from)
        if m.swap_lm:  # the export holds its LM: overwrite it in place (cast to its dtype), still frozen
            model.lm.load_state_dict(swapped_lm(m.lm, model.lm.cfg, m.init_from).state_dict())
        return model
    scfg = speech_llama_config(m.preset)
    lm = load_llama(m.lm) if m.lm else None
    if lm is None:
        scfg = replace(scfg, lm=replace(scfg.lm, vocab_size=tok.n_words))
    if m.encoder_from:
        from speech.pretrain import load_pretrained_encoder

        encoder = load_pretrained_encoder(m.encoder_from)
        scfg = replace(scfg, encoder=encoder.cfg)
    model = build_speech_llama(scfg if lm is None else replace(scfg, lm=lm.cfg), lm)
    if m.encoder_from:
        model.encoder.load_state_dict(encoder.state_dict(), strict=True)
    return model


class SpeechTask(nn.Module):
    """`SpeechLlama` + its loss as the engine's module, returning the same dict as `ImageTextTask`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, labels: Tensor, waves: Tensor, wave_lengths: Tensor,
                token_lengths: Tensor) -> dict[str, Tensor]:
        out = self.model(tokens, labels, waves, wave_lengths, token_lengths=token_lengths, return_logits=False)
        return {"loss": out.loss, "n_tokens": out.n_tokens}


def speech_codec(cfg: "RunConfig", tok: "Tokenizer", model: nn.Module) -> "Codec":
    from training.codecs import SpeechCodec

    return SpeechCodec(tok, model.cfg.features.sample_rate, cfg.data.prompt)


def speech_param_groups(cfg: "RunConfig", model: nn.Module) -> list[dict]:
    params = [p for _, p in model.trainable_named_parameters()]
    if any(p.requires_grad for p in model.lm.parameters()):
        raise TrainError("the speech model's LM has trainable parameters; it must stay frozen")
    return [{"params": params, "lr": cfg.optim.lr, "weight_decay": cfg.optim.weight_decay}]


def export_speech(model: nn.Module, cfg: "RunConfig", out: Path) -> Path:
    from speech.model_io import save_speech_checkpoint

    return save_speech_checkpoint(model, out, tokenizer_path=cfg.model.tokenizer)


# ------------------------------------------------------------------------------ registry


def task_of(cls: type[nn.Module]) -> Callable[["RunConfig", nn.Module], nn.Module]:
    """``build_task`` of a task that needs only the model: ``cls(model)``."""
    return lambda cfg, model: cls(model)


def _text_spec() -> TrainSpec:
    from training import text_lm

    return TrainSpec("text", text_lm.build_text_model, task_of(text_lm.TextTask), text_lm.text_codec,
                     text_lm.text_param_groups, text_lm.export_text, formats=("qa", "conversation"))


def _clip_spec() -> TrainSpec:
    from training import clip

    return TrainSpec("clip", clip.build_clip_model, task_of(clip.ClipTask), clip.clip_codec, clip.clip_param_groups,
                     clip.export_clip, formats=("caption",), needs_tokenizer=False)


def _rank_image_model(cfg: "RunConfig", tok: "Tokenizer | None", layout: "RankLayout") -> nn.Module:
    from training.loading import build_rank_image_model

    return build_rank_image_model(cfg, tok, layout)


# Speech reads no data.format: its samples are always ASR chat examples (data.prompt = the system turn);
# the default "caption" and "chat" are both accepted so existing configs stay valid.
SPECS: dict[str, TrainSpec] = {
    "image": TrainSpec("image", build_multimodal_model, image_text_task, image_codec, multimodal_param_groups,
                       export_multimodal, formats=("caption", "chat", "qa", "conversation"), pack_rows=True,
                       swap_lm=True, tensor_parallel=True, pipeline=True, build_rank_model=_rank_image_model),
    "video": TrainSpec("video", build_video_model, image_text_task, video_codec, multimodal_param_groups,
                       export_multimodal, formats=("caption", "chat", "qa", "conversation"), pack_rows=True,
                       swap_lm=True),
    "speech": TrainSpec("speech", build_speech_model, task_of(SpeechTask), speech_codec, speech_param_groups,
                        export_speech, formats=("caption", "chat"), swap_lm=True),
    "text": _text_spec(),
    "clip": _clip_spec(),
    "bestrq": bestrq_spec(),
    "reward": reward_spec(),
    "dpo": dpo_spec(),
}
