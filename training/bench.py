"""Measurement helpers for ``scripts.bench_train``: encoder time hooks, peak memory, FLOPs and MFU, the bare
PyTorch loop and the data-loader timing that the trainer's overhead is measured against, synthetic shards.

Kept apart from `training.trainer` / `training.pipeline` (they stay free of benchmarking code); nothing
here imports DeepSpeed or torch.distributed.

FLOP convention (`forward_flops`): matrix multiplications only, 2 FLOPs per multiply-add, per sample of
``seq_len`` text tokens and one image of ``n_tiles`` encoded tiles. Attention counts both products
(QK^T and AV) over the full score matrix, causal or not (PaLM's convention, and what
``torch.utils.flop_counter`` counts for SDPA); norms, softmax, activations, biases and the embedding
lookup are left out (a few percent at these widths). `train_flops` turns that into the model FLOPs of
one training sample: 3 x forward (the "6 N" convention: backward = 2 x forward), frozen LM included,
plus the estimate of what a frozen LM actually executes (no weight gradients for frozen matrices).
"""

from __future__ import annotations

import io
import resource
import statistics
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # the model packages import open_clip (seconds); only forward_flops needs them
    from adapters.multimodal import MultimodalConfig
    from training.data import MicroBatch, TrainBatches

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, from NVIDIA's datasheets. Looked up by substring of
# ``torch.cuda.get_device_name()``, first match wins: the specific H100 variants come before plain "H100".
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
)


class BenchError(RuntimeError):
    """A benchmark that cannot run or whose workers failed; the message says which and why."""


# ----------------------------------------------------------------------------------------------
# FLOPs and MFU


def forward_flops(cfg: MultimodalConfig, seq_len: int, n_tiles: int, n_supervised: int) -> dict[str, int]:
    """Forward FLOPs of one sample (see the module docstring for what is counted).

    ``n_tiles``: tile slots the encoder runs on (padded tiles of a real image are encoded too);
    ``n_supervised``: positions the LM head is applied to (``ImageTextTask`` projects only those).
    Returns per-component FLOPs: ``vision`` (patch conv + local and global blocks), ``projector``,
    ``cross_attention`` (the blocks and their K/V projections of the vision tokens), ``lm`` (frozen
    self-attention layers) and ``head`` (frozen output projection), with ``total``, and
    ``attention_products``: the QK^T / AV part of that total.
    """
    from vision.encoder_layers import num_pad_tokens

    v, lm = cfg.vision, cfg.lm
    W, g, N = v.width, v.grid_size, v.n_tokens
    hidden = int(W * v.mlp_ratio)
    L = n_tiles * (N + num_pad_tokens(N, v.pad_to_multiple))  # one attention sequence per image
    conv = 2 * n_tiles * g * g * (3 * v.patch_size**2) * W
    n_blocks = v.layers + v.n_global_layers
    vision_scores = n_blocks * 4 * L * L * W
    vision = conv + n_blocks * 2 * L * (4 * W * W + 2 * W * hidden) + vision_scores

    D, T, F, hd = lm.dim, seq_len, lm.ffn_dim, lm.head_dim
    q_dim, kv_dim = lm.n_heads * hd, lm.n_kv_heads * hd
    n_vis = n_tiles * N
    projector = 2 * n_vis * v.out_dim * D
    ffn = 2 * T * 3 * D * F
    self_scores, cross_scores = 4 * T * T * q_dim, 4 * T * n_vis * q_dim
    self_attn = 2 * T * (D * q_dim + 2 * D * kv_dim + q_dim * D) + self_scores + ffn
    cross = 2 * T * (D * q_dim + q_dim * D) + 2 * n_vis * 2 * D * kv_dim + cross_scores + ffn
    out = {"vision": vision, "projector": projector, "cross_attention": cfg.n_xattn * cross,
           "lm": lm.n_layers * self_attn, "head": 2 * n_supervised * D * lm.vocab_size}
    out["total"] = sum(out.values())
    # The attention products inside the components above (the fused SDPA kernels some FLOP counters miss).
    out["attention_products"] = vision_scores + cfg.n_xattn * cross_scores + lm.n_layers * self_scores
    return out


def train_flops(cfg: MultimodalConfig, fwd: dict[str, int]) -> dict[str, int]:
    """Training FLOPs of one sample from `forward_flops`.

    ``model``: 3 x the whole forward (frozen LM included): the usual MFU numerator ("6 N per token").
    ``executed_estimate``: what runs with the LM frozen: trainable parts 3 x forward; frozen self-attention
    layers and head 2 x (forward + input gradients, no weight gradients; their attention products still
    need both gradients, approximated by the 2 x here). A frozen encoder counts as frozen.
    """
    trainable = fwd["projector"] + fwd["cross_attention"] + (fwd["vision"] if cfg.train_vision else 0)
    frozen = fwd["total"] - trainable
    return {"model": 3 * fwd["total"], "executed_estimate": 3 * trainable + 2 * frozen}


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU by name (``torch.cuda.get_device_name()``); None if unknown."""
    name = device_name.upper()
    for key, peak in PEAK_BF16_FLOPS:
        if key.upper() in name:
            return peak
    return None


def mfu(flops_per_sample: float, samples_per_s: float, n_devices: int, peak_flops_per_device: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the summed peak of ``n_devices``."""
    if n_devices < 1 or peak_flops_per_device <= 0:
        raise BenchError(f"mfu: need n_devices >= 1 and a positive peak, got {n_devices}, {peak_flops_per_device}")
    return flops_per_sample * samples_per_s / (n_devices * peak_flops_per_device)


# ----------------------------------------------------------------------------------------------
# Memory


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_memory(device: torch.device | str = "cpu") -> bool:
    """Start a new peak-memory window; returns whether it could (CPU: Linux >= 4.0 ``clear_refs``)."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def current_memory_mib(device: torch.device | str = "cpu") -> float | None:
    """Memory in use now: ``torch.cuda.memory_allocated`` on CUDA, else the RSS (None if unknown)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    rss = _proc_status_kib("VmRSS")
    return None if rss is None else rss / 1024


def peak_memory_mib(device: torch.device | str = "cpu") -> tuple[float, str]:
    """(peak, source) of this process: ``torch.cuda.max_memory_allocated`` on CUDA, else the peak RSS.

    CPU: ``VmHWM`` from /proc/self/status (the peak of this process's own address space). ``ru_maxrss``
    is only the fallback: Linux carries it across fork + exec, so a worker spawned by a large parent
    would report the parent's peak.
    """
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "torch.cuda.max_memory_allocated"
    hwm = _proc_status_kib("VmHWM")
    if hwm is not None:
        return hwm / 1024, "VmHWM (peak RSS, /proc/self/status)"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "ru_maxrss"


# ----------------------------------------------------------------------------------------------
# Encoder time


class EncoderTimer:
    """Wall time spent in an image encoder's forward and backward, from hooks.

    Forward: a forward pre-hook on ``first`` to a forward hook on ``last`` (the same module when one
    module is the whole encoder; a tuple output's last element is taken as the encoder output).
    Backward: from the moment autograd reaches the encoder output (a hook on its gradient) to the last
    post-accumulate-grad hook of ``params`` in that backward pass. Autograd runs ready nodes
    latest-created first, so the rest of the stage (created after the encoder) is done by then and the
    interval is the encoder's own backward, including any per-parameter gradient hooks (DeepSpeed's
    FP32 accumulation); the all-reduce of gradients after backward is not in it. On CUDA each hook
    synchronises first (``sync=True``), which slows the run slightly but times kernels, not launches.
    """

    def __init__(self, first: nn.Module, last: nn.Module, params: Iterable[nn.Parameter], sync: bool = False):
        self.forward_s = self.backward_s = 0.0
        self.forward_calls = self.backward_calls = 0
        self._sync = sync
        self._t_fwd: float | None = None
        self._bwd_start: float | None = None
        self._bwd_last: float | None = None
        self._handles = [first.register_forward_pre_hook(self._pre), last.register_forward_hook(self._post)]
        params = [p for p in params if p.requires_grad]
        if not params:
            raise BenchError("EncoderTimer: the encoder has no trainable parameter, its backward cannot be timed")
        self._handles += [p.register_post_accumulate_grad_hook(self._accumulated) for p in params]

    def _now(self) -> float:
        if self._sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _pre(self, module, args) -> None:
        self._close_backward()
        self._t_fwd = self._now()

    def _post(self, module, args, out) -> None:
        self.forward_s += self._now() - self._t_fwd
        self.forward_calls += 1
        feats = out[-1] if isinstance(out, tuple) else out
        if isinstance(feats, Tensor) and feats.requires_grad:
            feats.register_hook(self._grad_arrives)

    def _grad_arrives(self, grad: Tensor) -> None:
        self._close_backward()
        self._bwd_start = self._now()

    def _accumulated(self, param: Tensor) -> None:
        if self._bwd_start is not None:
            self._bwd_last = self._now()

    def _close_backward(self) -> None:
        if self._bwd_start is not None and self._bwd_last is not None:
            self.backward_s += self._bwd_last - self._bwd_start
            self.backward_calls += 1
        self._bwd_start = self._bwd_last = None

    def reset(self) -> None:
        """Forget what was timed so far (after warm-up steps)."""
        self._close_backward()
        self.forward_s = self.backward_s = 0.0
        self.forward_calls = self.backward_calls = 0

    def totals(self) -> dict[str, float | int]:
        """Close the last backward and return the seconds and call counts so far."""
        self._close_backward()
        return {"forward_s": self.forward_s, "backward_s": self.backward_s,
                "forward_calls": self.forward_calls, "backward_calls": self.backward_calls}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()



# ----------------------------------------------------------------------------------------------
# Trainer overhead: the bare loop, the data loader alone, synthetic caption shards

WORDS = ("red", "green", "blue", "small", "large", "square", "circle", "on", "a", "the", "left", "right", "of",
         "photo", "drawing", "bright", "dark", "striped", "dotted", "near", "above", "below", "two", "three")


def write_caption_shards(root: Path, n_shards: int, per_shard: int, seed: int = 0) -> tuple[str, list[str]]:
    """``n_shards`` image-caption tars ``root/shard_NNNNN.tar`` (key.jpg of random pixels, 56 to 168 px a side,
    so an image tiles into 1 to 4 tiles of 56 px; key.txt of 3 to 12 words); returns their brace pattern
    and the captions (to train a tokenizer on)."""
    import numpy as np
    import webdataset as wds
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    captions = []
    for s in range(n_shards):
        with wds.TarWriter(str(root / f"shard_{s:05d}.tar")) as w:
            for i in range(per_shard):
                h, wd = (int(x) for x in rng.choice((56, 112, 168), size=2))
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (h, wd, 3), dtype=np.uint8)).save(buf, "JPEG")
                caption = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 13))))
                captions.append(caption)
                w.write({"__key__": f"s{s}_{i:04d}", "jpg": buf.getvalue(), "txt": caption})
    return f"{root}/shard_{{00000..{n_shards - 1:05d}}}.tar", captions


def time_loader(batches: TrainBatches, n: int, warmup: int = 0) -> tuple[list[MicroBatch], dict[str, float | int]]:
    """Take ``warmup`` untimed micro-batches from ``batches`` (the first opens a tar and initialises the
    decoders), then ``n`` timed ones (tar read, decode, tiling, packing, collate); returns all of them, in
    order (to replay), and the throughput of the timed ones."""
    out = [next(batches) for _ in range(warmup)]
    times = []
    samples0 = batches.samples_delivered
    for _ in range(n):
        t0 = time.perf_counter()
        out.append(next(batches))
        times.append(time.perf_counter() - t0)
    total = sum(times)
    samples = batches.samples_delivered - samples0
    tokens = sum(mb.tokens.numel() for mb in out[warmup:])
    return out, {"micro_batches": n, "warmup_micro_batches": warmup, "samples": samples, "seconds": total,
                 "samples_per_s": samples / total, "micro_batches_per_s": n / total, "tokens_per_s": tokens / total,
                 "median_micro_batch_s": statistics.median(times)}


def _to(x, device: torch.device):
    return x.to(device) if hasattr(x, "to") else x


def bare_step_times(task: nn.Module, groups: list[dict], micro_batches: list[MicroBatch], gas: int,
                    dtype: torch.dtype, betas: tuple[float, float], clip: float) -> list[float]:
    """Seconds per optimizer step of a plain PyTorch loop: ``task`` (model + loss) cast to ``dtype``,
    ``torch.optim.AdamW`` on ``groups``, ``gas`` micro-batches of ``micro_batches`` per step in order (the
    loss divided by ``gas``, as DeepSpeed scales it), gradient clipping when ``clip`` > 0, one ``.item()``
    per step for the loss. Runs ``len(micro_batches) // gas`` steps on the task's device."""
    if len(micro_batches) < gas:
        raise BenchError(f"bare_step_times: {len(micro_batches)} micro-batches for {gas} per step")
    task.to(dtype)
    device = next(task.parameters()).device
    opt = torch.optim.AdamW(groups, betas=betas)
    params = [p for g in groups for p in g["params"]]
    cuda = device.type == "cuda"
    times = []
    for i in range(len(micro_batches) // gas):
        t0 = time.perf_counter()
        total = torch.zeros((), device=device)
        for mb in micro_batches[i * gas : (i + 1) * gas]:
            media = {k: _to(v, device) for k, v in mb.media.items()}
            loss = task(mb.tokens.to(device), mb.labels.to(device), **media)["loss"]
            (loss / gas).backward()
            total += loss.detach().float()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(total).item():
            raise BenchError(f"bare_step_times: step {i + 1}: non-finite loss")
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times
