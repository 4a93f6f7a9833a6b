"""The run config of the training scripts: nested dataclasses <- YAML <- ``--set a.b=value`` overrides.

Merged once at the entry point (CONVENTIONS 7) and written, resolved, into the run directory as
``config.yaml`` beside the DeepSpeed JSON actually used (``deepspeed.json``). Unknown keys anywhere raise
`TrainConfigError` naming the file and the dotted key, so a typo never silently keeps a default.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from common.config import config_to_dict, dataclass_from_dict, read_yaml_mapping, yaml_options
from speech.bestrq import BestRQConfig

PARALLEL = ("data", "pipeline")


class TrainConfigError(ValueError):
    """A run or DeepSpeed config that cannot be used; the message names the file and the key."""


class ResumeConfigError(TrainConfigError):
    """A resumed run whose config differs from its checkpoint's where the checkpoint cannot honour it."""


RUN_YAML = yaml_options(TrainConfigError)  # missing keys and null sections keep their defaults


@dataclass(frozen=True)
class ModelConfig:
    """Which model trains and where its weights start.

    preset: a `multimodal_config` / `speech_llama_config` preset ("tiny", "11B", ...); its vocab is resized
        to the tokenizer's ``n_words`` when ``lm`` is None (tiny runs with a random frozen LM).
    lm: a Llama 3 checkpoint directory (Meta or HF layout) for the frozen LM; None = random (tests only).
    init_from: a checkpoint directory of ours (`adapters.model_io`) to start from: stage 2 anneals from
        the stage-1 export, the video stage starts from an image export.
    swap_lm: SFT's hot-swap (Llama 3 sec. 7.5): ``lm`` replaces the frozen LM of ``init_from`` (image,
        video, speech), e.g. the instruction-tuned weights for the pre-trained ones. Its config (every size
        and the vocabulary) must equal the one the export recorded, else `LMMismatchError` naming the
        fields; its weights may differ, and every other weight loads unchanged. Without it, an LM other than
        the export's is refused (fingerprint). The new export records the new LM.
    bestrq: the quantizer, heads and masking of the ``bestrq`` kind (whose ``preset`` names a
        `speech.conformer` preset); read by that kind only.
    tile_size / max_tiles: per-tile resolution; stage 2 raises ``tile_size`` (position tables are
        interpolated when ``init_from`` was trained at another size, see `training.trainer`).
    attn_bias: whether the vision blocks have attention biases (`vision.encoder.VisionEncoderConfig`): None =
        the preset's (open_clip's layout, true) or ``init_from``'s; false builds them without (the Mllama layout,
        what `scripts.export_hf` can write). An ``init_from`` export of the other layout is refused.
    """

    preset: str = "tiny"
    tokenizer: str = ""  # tokenizer.model (tiktoken); copied into every export
    lm: str | None = None
    init_from: str | None = None
    swap_lm: bool = False
    # speech: a bestrq run's export dir; image: a clip run's export dir
    encoder_from: str | None = None
    tile_size: int | None = None  # None: the preset's (or init_from's)
    max_tiles: int | None = None
    attn_bias: bool | None = None
    train_vision: bool = True
    num_frames: int = 16  # video: frames sampled per clip ("pre-training uses 16 frames", sec. 7.3)
    seed: int = 0  # initialisation of the new layers (and of a random LM)
    bestrq: BestRQConfig = field(default_factory=BestRQConfig)


@dataclass(frozen=True)
class SourceConfig:
    """One source of a data mix (``data.sources``): its shards, their sample format and its sampling weight.

    shards / format: as ``data.shards`` / ``data.format`` of a one-source run.
    weight: > 0; the next sample comes from this source with probability weight / (sum of the weights).
    name: what the run's report calls it; "" = ``sources[i]``.
    """

    shards: str
    weight: float
    format: str = "caption"
    name: str = ""


@dataclass(frozen=True)
class DataConfig:
    """Webdataset shards and how samples become micro-batches (see `training.data`).

    shards: a path, glob or brace pattern (``out/shards/shard_{00000..00003}.tar``).
    sources: instead of ``shards`` / ``format``, a weighted mix of several shard sets, each with its own format
        (`SourceConfig`; the annealing mix, Llama 3 sec. 7.1): every source an endless stream of its own, the
        next sample drawn from source i with probability weight_i / sum (`training.data.MixStream`); the run
        logs the realised per-source sample counts beside the weights. ``shards`` stays empty and ``format`` at
        its default (a mix's formats are its sources').
    format: "caption" = ``<bos><|image|>caption<eos>`` (pre-training: loss on the caption and eos);
        "chat" = the Llama 3 chat format with ``prompt`` as the user turn and the text as the answer;
        "qa" = the chat format with each sample's own ``question`` (key.json meta) as the user turn and its
        ``answer`` as the assistant turn (image, video, text); "conversation" = key.json meta ``conversations``
        (system / user / assistant turns, ``<|image|>`` placeholders in user turns for the sample's images
        key.0.jpg, key.1.jpg, ... in order; text-only conversations mix in; loss on every assistant turn;
        data-parallel mode); for the video kind ``<|video|>`` placeholders and key.0.mp4, key.1.mp4, ...; the
        text kind's conversations hold no placeholder;
        "preference" = key.json meta ``conversations`` (the prompt, ending with a user turn) with ``chosen``,
        ``rejected`` and optionally ``edited`` answers (``reward`` and ``dpo`` kinds, `training.preference`).
        Speech always uses its chat format, ``prompt`` as the system turn, default ASR. Which formats a
        kind takes: `training.spec.SPECS`.
    max_tokens: token budget of one micro-batch (rows x longest row); short texts give more rows.
    max_rows: most rows per micro-batch (bestrq: clips per micro-batch).
    pack_rows: several consecutive samples share a row (up to ``max_seq_len`` tokens) with a document mask
        (image and video kinds, data-parallel mode; see `training.data`).
    """

    shards: str = ""
    sources: tuple[SourceConfig, ...] | None = None
    format: str = "caption"
    prompt: str = ""  # chat: the user turn ("" = "Describe the image/video."); speech: the system prompt
    max_seq_len: int = 256  # longer texts are an error naming the sample, never truncated silently
    max_tokens: int = 2048
    max_rows: int = 8
    pack_rows: bool = False
    shuffle_buffer: int = 64
    seed: int = 0
    on_error: str = "raise"  # "raise" or "count" (bad samples counted per shard and key in the log)
    crop_seconds: float = 60.0  # bestrq: longer clips are randomly cropped to this (sec. 8.1: 6,000 frames)

    def source_list(self) -> list[SourceConfig]:
        """The mix's sources, or the one source of ``shards`` / ``format`` (weight 1)."""
        if self.sources is None:
            return [SourceConfig(self.shards, 1.0, self.format)]
        return list(self.sources)

    def source_names(self) -> list[str]:
        return [s.name or f"sources[{i}]" for i, s in enumerate(self.source_list())]

    def for_source(self, i: int) -> "DataConfig":
        """The one-source data config of source ``i`` (what its codec is built from)."""
        s = self.source_list()[i]
        return replace(self, shards=s.shards, format=s.format, sources=None)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    encoder_lr_scale: float = 0.1  # the pre-trained image encoder moves slower than the new layers
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at train.steps


@dataclass(frozen=True)
class PreferenceConfig:
    """The preference kinds (`training.preference`, Llama 3 sec. 7.5), on ``data.format: preference`` samples.

    reward_reg: the reward model's regulariser, this times the squared reward averaged over the batch (keeps
        the rewards near 0 so they do not drift; ``reward`` kind).
    beta: DPO's temperature on the log-ratio of policy and reference (``dpo`` kind).
    ema / ref_every: every ``ref_every`` optimizer steps the reference moves towards the policy,
        ``reference <- (1 - ema) * reference + ema * policy`` (the paper's EMA-refreshed reference; TRL's
        TR-DPO uses 0.6 every 512 steps, our defaults); ``ema: 0`` keeps the reference frozen at the start.
    nll_weight: weight of an NLL term (mean over tokens) on the preferred answers, added to DPO's loss.
    """

    reward_reg: float = 0.01
    beta: float = 0.1
    ema: float = 0.6
    ref_every: int = 512
    nll_weight: float = 0.0


@dataclass(frozen=True)
class TrainLoopConfig:
    steps: int = 1000  # optimizer steps (each = gradient_accumulation_steps micro-batches per rank)
    run_dir: str = "runs/train"
    save_every: int = 500
    log_every: int = 10
    export: bool = True  # write run_dir/export (config.json + model.safetensors + tokenizer.model) at the end
    resume: bool = True  # continue from run_dir/checkpoints/latest when it exists
    progress: bool = True


@dataclass(frozen=True)
class RunConfig:
    kind: str = "image"  # a key of training.spec.SPECS: image | video | speech | text | clip | bestrq
    parallel: str = "data"
    deepspeed: str = "configs/deepspeed/zero1_bf16_fp32accum.json"
    pipeline_stages: int = 2
    # Megatron-style tensor parallelism inside data-parallel mode (image kind): consecutive groups of this
    # many ranks shard every LM and cross-attention layer (`training.tensor_parallel`); the data-parallel
    # world is world / tensor_parallel.
    tensor_parallel: int = 1
    # The image encoder's token sequence split across the tensor-parallel group (Llama 3 sec. 7.3.2: an image's
    # 2,308 tokens against 192 of text; `training.sequence_parallel`); data-parallel mode with
    # tensor_parallel > 1. recompute_kv: the gathered keys / values are dropped after the forward and gathered
    # again in the backward (less memory, one more all-gather per block).
    encoder_sequence_parallel: bool = False
    encoder_sp_recompute_kv: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)

    def __post_init__(self) -> None:
        from training.spec import SPECS

        if self.kind not in SPECS:
            raise TrainConfigError(f"kind: {self.kind!r} is not one of {tuple(SPECS)}")
        spec = SPECS[self.kind]
        checks = [
            (self.parallel in PARALLEL, "parallel", f"{self.parallel!r} is not one of {PARALLEL}"),
            (self.parallel == "data" or spec.pipeline, "parallel",
             f"pipeline lays out the image model only, not kind {self.kind!r}"),
            *self._source_checks(spec),
            (self.data.on_error in ("raise", "count"), "data.on_error",
             f"{self.data.on_error!r} is not raise | count"),
            (self.data.max_rows >= 1 and self.data.max_tokens >= self.data.max_seq_len, "data.max_tokens",
             "max_rows must be >= 1 and max_tokens >= max_seq_len (one full-length sample must fit)"),
            (not self.data.pack_rows or (spec.pack_rows and self.parallel == "data"),
             "data.pack_rows", "packs image or video samples in data-parallel mode only (speech rows splice "
             "audio into the embeddings; pipeline stages need fixed shapes)"),
            (self.tensor_parallel == 1 or (self.tensor_parallel > 1 and spec.tensor_parallel), "tensor_parallel",
             f"{self.tensor_parallel}: must be >= 1, and > 1 only for the image kind"),
            (not self.encoder_sequence_parallel or (self.tensor_parallel > 1 and self.parallel == "data"),
             "encoder_sequence_parallel", "splits the encoder over the tensor-parallel group: needs tensor_parallel "
             f"> 1 in data-parallel mode (got tensor_parallel={self.tensor_parallel}, parallel={self.parallel})"),
            (not self.encoder_sp_recompute_kv or self.encoder_sequence_parallel, "encoder_sp_recompute_kv",
             "needs encoder_sequence_parallel: true"),
            (self.train.steps >= 1 and self.train.save_every >= 1 and self.train.log_every >= 1, "train",
             "steps, save_every and log_every must be >= 1"),
            (0 <= self.optim.min_lr_ratio <= 1 and self.optim.warmup >= 0, "optim",
             "warmup >= 0, 0 <= min_lr_ratio <= 1"),
            (self.data.crop_seconds > 0, "data.crop_seconds", f"{self.data.crop_seconds} must be > 0"),
            (0 <= self.preference.ema <= 1 and self.preference.ref_every >= 1 and self.preference.beta > 0
             and self.preference.reward_reg >= 0 and self.preference.nll_weight >= 0, "preference",
             "0 <= ema <= 1, ref_every >= 1, beta > 0, reward_reg >= 0 and nll_weight >= 0"),
            (not self.model.swap_lm or (spec.swap_lm and self.model.init_from and self.model.lm), "model.swap_lm",
             "needs model.init_from (the export whose weights are kept) and model.lm (the LM swapped in), "
             f"kinds {[k for k, s in SPECS.items() if s.swap_lm]} only"),
        ]
        for ok, key, msg in checks:
            if not ok:
                raise TrainConfigError(f"{key}: {msg}")

    def _source_checks(self, spec) -> list[tuple[bool, str, str]]:
        """(ok, key, message) of ``data.format``, or of every ``data.sources[i]`` of a mix."""
        d = self.data
        if d.sources is None:
            where = [("data.format", d.format)]
            checks = []
        else:
            where = [(f"data.sources[{i}].format", s.format) for i, s in enumerate(d.sources)]
            names = d.source_names()
            checks = [(not d.shards, "data.sources / data.shards", "give one: data.shards (one source) or "
                       "data.sources (a weighted mix), not both"),
                      (d.format == "caption", "data.sources / data.format", "each source has its own format "
                       "(data.sources[i].format); drop data.format"),
                      (len(d.sources) > 0, "data.sources", "an empty list; give at least one source"),
                      *((s.weight > 0, f"data.sources[{i}].weight", f"{s.weight} must be > 0")
                        for i, s in enumerate(d.sources)),
                      *((bool(s.shards.strip()), f"data.sources[{i}].shards", "empty; give a path, glob or brace "
                         "pattern") for i, s in enumerate(d.sources)),
                      *((names.index(n) == i, f"data.sources[{i}].name", f"{n!r} names an earlier source too")
                        for i, n in enumerate(names))]
        for key, fmt in where:
            checks += [(fmt in spec.formats, key, f"{fmt!r} is not one of kind {self.kind}'s formats {spec.formats}"),
                       (fmt != "conversation" or self.parallel == "data", key, "conversation samples hold any "
                        "number of images per row; pipeline stages take one image slot")]
        return checks


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.steps=10"`` -> (["train", "steps"], 10); the value is read as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise TrainConfigError(f"--set {text!r}: expected KEY=VALUE (e.g. train.steps=10)")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults <- YAML file <- dotted overrides; every unknown key raises `TrainConfigError`."""
    where = str(path) if path is not None else "run config"
    data = read_yaml_mapping(path, TrainConfigError) if path is not None else {}
    for text in overrides or []:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise TrainConfigError(f"--set {text}: {k} is not a section")
        node[keys[-1]] = value
    return dataclass_from_dict(RunConfig, data, where, RUN_YAML)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}``: nested mappings to dotted keys."""
    flat = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        flat.update(flatten(v, key + ".") if isinstance(v, dict) and v else {key: v})
    return flat


def resume_changes(saved: dict, now: dict, mutable: frozenset[str], where: str) -> list[str]:
    """The changes from ``saved`` (the checkpoint's run record) to ``now`` that a resume applies, as
    ``"key: old -> new"`` over dotted keys; any other change raises `ResumeConfigError` naming every such
    key with both values on one line (the optimizer and scheduler states come from the checkpoint, so a
    new ``optim.lr`` would be silently ignored, a new data seed would not match the saved data position)."""
    old, new = flatten(saved), flatten(now)
    diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    shown = {k: f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}" for k in diff}
    refused = [shown[k] for k in diff if k not in mutable]
    if refused:
        raise ResumeConfigError(f"{where}: the checkpoint cannot honour these changes (checkpoint -> now): "
                                f"{', '.join(refused)}; resume with the checkpoint's values or start a new "
                                "run directory")
    return [shown[k] for k in diff]


def load_deepspeed_config(path: str | Path) -> dict:
    try:
        ds = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainConfigError(f"deepspeed: {path}: not found") from None
    except json.JSONDecodeError as e:
        raise TrainConfigError(f"deepspeed: {path}: not valid JSON ({e})") from None
    if not isinstance(ds, dict):
        raise TrainConfigError(f"deepspeed: {path}: expected a JSON object")
    if "optimizer" in ds or "scheduler" in ds:
        # One source of truth: AdamW groups and the warmup + cosine schedule come from the run config.
        raise TrainConfigError(f"deepspeed: {path}: 'optimizer' / 'scheduler' belong in the run config's optim "
                               "section (the trainer builds them), remove them here")
    return ds


def resolve_deepspeed(ds: dict, world_size: int, where: str) -> dict:
    """Fill ``train_batch_size`` (= micro x accumulation x data-parallel world), checking a given one, and
    refuse the bf16 + fp32-accumulation mix that DeepSpeed supports only with ZeRO stage 1."""
    ds = json.loads(json.dumps(ds))
    micro = int(ds.setdefault("train_micro_batch_size_per_gpu", 1))
    gas = int(ds.setdefault("gradient_accumulation_steps", 1))
    want = micro * gas * world_size
    if ds.setdefault("train_batch_size", want) != want:
        raise TrainConfigError(f"deepspeed: {where}: train_batch_size {ds['train_batch_size']} != micro {micro} "
                               f"x accumulation {gas} x world {world_size}")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    accum = ds.get("data_types", {}).get("grad_accum_dtype")
    if ds.get("bf16", {}).get("enabled") and accum == "fp32" and stage != 1:
        raise TrainConfigError(f"deepspeed: {where}: bf16 with data_types.grad_accum_dtype fp32 needs "
                               f"zero_optimization.stage 1 (got {stage}); ZeRO-2 takes fp32 or plain bf16")
    return ds


def write_resolved(cfg: RunConfig, ds: dict, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    (run_dir / "deepspeed.json").write_text(json.dumps(ds, indent=2))


def with_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply dotted overrides to an already built config (tests and scripts that start from one)."""
    data = config_to_dict(cfg)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                raise TrainConfigError(f"--set {text}: unknown section {k}")
            node = node[k]
        if keys[-1] not in node:
            raise TrainConfigError(f"--set {text}: unknown key {'.'.join(keys)}")
        node[keys[-1]] = value
    return dataclass_from_dict(RunConfig, data, "overrides", RUN_YAML)
