"""Speed and memory of our multimodal model next to Hugging Face's Mllama, on one mid-size CPU config.

    python -m scripts.bench_model [--json] [--repeats N] [--warmup N] [--no-memory]

One HF ``MllamaForConditionalGeneration`` (transformers, ``attn_implementation="sdpa"``) is built at random,
made release-like (non-zero gates, consistent tile tables), saved, and loaded into ours with
``adapters.mllama.load_mllama``: both models hold the same weights, so their losses and greedy tokens are
compared too (as a sanity check of the benchmark, not a goal). Measured, fp32, median of ``--repeats`` after
``--warmup`` runs, ours and HF interleaved run by run so shared-CPU noise hits both alike:

1. training step: forward + backward of the loss (no optimiser step), LM frozen in both, the same
   trainable set (encoder, projector, cross-attention layers; HF's image-token row sits in its frozen
   embedding matrix, so ours keeps its image rows frozen here too); seconds/step, ratio ours / HF,
   goal <= 1.0. Ours with trainable image rows (the default recipe) is timed as well, for reference;
2. greedy decoding with cached self-attention and vision K/V: ``adapters.generation.generate`` vs HF
   ``generate(do_sample=False, min_new_tokens=max_new_tokens)``; generated tokens/s (prefill and vision
   encoding included in the time, only generated tokens counted), ratio ours / HF, goal >= 1.5;
3. text-only batch forward: our multimodal model without images vs the bare ``Llama`` (``model.lm``),
   ratio goal <= 1.05;
4. memory: each measurement once more in its own spawned process, peak RSS growth of one (cold) call;
5. roofline of decoding (``--no-roofline`` skips it), in fp32 and bf16, batch 1 and 2: the bytes one decoding
   step must read (every weight it touches: the LM's layers, norms and output matrix, one embedding row per
   row of the batch, the cross-attention blocks' query / output / feed-forward weights; plus the self-attention
   KV cache at its mean length over the generation and the cached vision K/V of every cross-attention block),
   divided by this machine's memory bandwidth measured in the same run (the rate ``torch.mv`` streams a matrix
   far larger than the caches, best of several), is the fastest a step can be; the measured step is
   the time of ``max_new_tokens`` decoding steps without prefill (a run of N new tokens minus a run of 1, both
   medians), for ours and for HF in the same dtype. Reported: the bound, each step time as a multiple of it
   (goal <= 1.2 for ours), and ours / HF tokens per second (goal >= 1.5 where the bound allows).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

_DEFAULT_THREADS = torch.get_num_threads()

# ----------------------------------------------------------------------------------------------
# The benchmark configuration (one mid-size CPU model)

VOCAB = 2048  # text vocab; <|image|> enters as id VOCAB, the first of 8 learnable rows
N_LEARNABLE = 8
DIM, N_LAYERS, N_HEADS, N_KV_HEADS, FFN = 512, 8, 8, 2, 1536
XATTN_EVERY = 4  # ours: 8 // 4 = 2 cross-attention blocks, before self-attention layers [3, 7]
HF_CROSS_LAYERS = list(range(XATTN_EVERY - 1, N_LAYERS + N_LAYERS // XATTN_EVERY, XATTN_EVERY + 1))  # [3, 8]
V_WIDTH, V_HEADS, V_LAYERS, V_GLOBAL, PATCH, TILE, MAX_TILES = 256, 4, 4, 2, 14, 112, 4
TAPS = (1, 3)
BATCH, TEXT_LEN, IMAGE_POS = 2, 64, 0  # <|image|> first, as HF's processor lays out base-model prompts
IMAGE_WH = (200, 100)  # -> a 1x2 tile layout at 112 px tiles
N_SUPERVISED = 32  # the last positions carry labels (the "answer")
MAX_NEW_TOKENS = 32
GATE = 0.5  # every gate set to this (fresh gates are 0: the adapters would be the identity)

GOALS = {"training_step": ("ours_s / hf_s", "<=", 1.0),
         "decoding": ("ours_tokens_per_s / hf_tokens_per_s", ">=", 1.5),
         "text_only_forward": ("multimodal_no_images_s / bare_llama_s", "<=", 1.05)}


def hf_config():
    from transformers import MllamaConfig

    text = dict(
        vocab_size=VOCAB, hidden_size=DIM, num_hidden_layers=N_LAYERS + len(HF_CROSS_LAYERS),
        cross_attention_layers=HF_CROSS_LAYERS, num_attention_heads=N_HEADS, num_key_value_heads=N_KV_HEADS,
        intermediate_size=FFN, rope_theta=500000.0, max_position_embeddings=131072,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        pad_token_id=0, bos_token_id=None, eos_token_id=None, initializer_range=0.02,
    )
    vision = dict(
        image_size=TILE, patch_size=PATCH, hidden_size=V_WIDTH, num_hidden_layers=V_LAYERS,
        num_global_layers=V_GLOBAL, attention_heads=V_HEADS, intermediate_size=4 * V_WIDTH,
        intermediate_layers_indices=list(TAPS), vision_output_dim=V_WIDTH * (1 + len(TAPS)),
        max_num_tiles=MAX_TILES, initializer_range=0.02,
    )
    return MllamaConfig(text_config=text, vision_config=vision, image_token_index=VOCAB)


def config_summary() -> dict:
    n_tokens = (TILE // PATCH) ** 2 + 1
    return {
        "dtype": "float32",
        "lm": {"dim": DIM, "n_layers": N_LAYERS, "n_heads": N_HEADS, "n_kv_heads": N_KV_HEADS, "ffn_dim": FFN,
               "vocab_size": VOCAB, "n_learnable_embeddings": N_LEARNABLE},
        "cross_attention": {"xattn_every": XATTN_EVERY, "n_blocks": N_LAYERS // XATTN_EVERY,
                            "hf_cross_attention_layers": HF_CROSS_LAYERS},
        "vision": {"width": V_WIDTH, "heads": V_HEADS, "layers": V_LAYERS, "global_layers": V_GLOBAL,
                   "patch_size": PATCH, "tile_size": TILE, "max_tiles": MAX_TILES, "taps": list(TAPS),
                   "vision_output_dim": V_WIDTH * (1 + len(TAPS)), "tokens_per_tile": n_tokens,
                   "vision_tokens_per_image": MAX_TILES * n_tokens},
        "batch": BATCH, "text_len": TEXT_LEN, "image_token_position": IMAGE_POS, "images_per_row": 1,
        "image_size_wh": list(IMAGE_WH), "tile_layout": [1, 2], "supervised_positions": N_SUPERVISED,
        "max_new_tokens": MAX_NEW_TOKENS, "gates": GATE,
    }


# ----------------------------------------------------------------------------------------------
# Models (same weights) and inputs


def _release_like(model) -> None:
    """Non-zero gates, and HF tile tables that are one per-cell grid (what HF's converter writes)."""
    from adapters.mllama import grid_to_tile_table

    g = torch.Generator().manual_seed(1)
    vm = model.model.vision_model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate", "gate_attn", "gate_ffn", "_attn_gate", "_mlp_gate")):
                p.fill_(GATE)
        N, W = vm.num_patches, vm.hidden_size
        for module, tokens in ((vm.gated_positional_embedding.tile_embedding, N),
                               (vm.pre_tile_positional_embedding.embedding, 1),
                               (vm.post_tile_positional_embedding.embedding, 1)):
            grid = torch.randn(MAX_TILES, MAX_TILES, tokens, W, generator=g) * 0.1
            module.weight.copy_(grid_to_tile_table(grid))


def write_checkpoint(path: Path) -> None:
    from transformers import MllamaForConditionalGeneration

    torch.manual_seed(0)
    model = MllamaForConditionalGeneration(hf_config()).eval()
    _release_like(model)
    model.save_pretrained(path)


def load_hf(path: Path):
    from transformers import MllamaForConditionalGeneration

    model = MllamaForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa",
                                                           torch_dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # no early stop: exactly max_new_tokens per row
    model.generation_config.pad_token_id = 0
    model.generation_config.bos_token_id = None
    # Frozen LM: only the cross-attention layers of language_model train. HF keeps the image-token rows in
    # the one embed_tokens matrix (no separate learnable table), so the whole matrix stays frozen.
    lm = model.model.language_model
    for name, p in lm.named_parameters():
        p.requires_grad_(any(name.startswith(f"layers.{i}.") for i in HF_CROSS_LAYERS))
    model.lm_head.requires_grad_(False)
    return model


def load_ours(path: Path):
    from adapters.mllama import load_mllama

    model = load_mllama(path).eval()
    cfg = model.cfg
    assert (cfg.lm.dim, cfg.lm.n_layers, cfg.lm.n_heads, cfg.lm.n_kv_heads, cfg.lm.ffn_dim, cfg.lm.vocab_size) == (
        DIM, N_LAYERS, N_HEADS, N_KV_HEADS, FFN, VOCAB), cfg.lm
    # The loader picks the smallest xattn_every giving 2 blocks over 8 layers (3); the schedule is what counts.
    assert model.schedule == [XATTN_EVERY - 1, 2 * XATTN_EVERY - 1], model.schedule  # before layers [3, 7]
    assert cfg.n_learnable_embeddings == N_LEARNABLE, cfg
    assert not any(p.requires_grad for p in model.lm.parameters()), "the LM must be frozen"
    return model


def make_inputs() -> dict:
    from adapters.multimodal import ImageBatch
    from vision.tiling import TilingConfig, collate_tiled, tile_image

    rng = np.random.default_rng(0)
    w, h = IMAGE_WH
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _ in range(BATCH)]
    tcfg = TilingConfig(tile_size=TILE, max_tiles=MAX_TILES)
    batch = collate_tiled([[tile_image(im, tcfg)] for im in images])
    assert batch["layouts"][:, 0].tolist() == [[1, 2]] * BATCH, batch["layouts"]

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, VOCAB, (BATCH, TEXT_LEN), generator=g)  # never 0 (= pad id)
    text_tokens = tokens.clone()  # text-only batch: no <|image|>
    tokens[:, IMAGE_POS] = VOCAB
    labels = torch.full_like(tokens, -100)
    labels[:, -N_SUPERVISED:] = tokens[:, -N_SUPERVISED:]

    tile_mask = batch["tile_mask"]  # (B, I, tiles)
    sees = (torch.arange(TEXT_LEN) >= IMAGE_POS)[None, :, None, None]  # text at/after the image token
    xmask = (sees & tile_mask[:, None]).long()  # (B, T, I, tiles)
    hf = dict(input_ids=tokens, attention_mask=torch.ones_like(tokens), pixel_values=batch["tiles"],
              aspect_ratio_ids=batch["layout_ids"], aspect_ratio_mask=tile_mask.long(),
              cross_attention_mask=xmask)
    return dict(tokens=tokens, text_tokens=text_tokens, labels=labels, images=ImageBatch.from_collated(batch),
                hf=hf)


# ----------------------------------------------------------------------------------------------
# One run of each measurement (built from already-loaded models)


def train_step_ours(model, x, train_image_rows: bool = False) -> Callable[[], float]:
    """Ours with HF's trainable set (encoder, projector, cross-attention), or also the image-token rows."""
    from adapters.task import ImageTextTask

    task = ImageTextTask(model).train()

    def run() -> float:
        model.learnable_embedding.requires_grad_(train_image_rows)
        model.zero_grad(set_to_none=True)
        loss = task(x["tokens"], x["labels"], x["images"])["loss"]
        loss.backward()
        return loss.item()

    return run


def train_step_hf(model, x) -> Callable[[], float]:
    model.train()

    def run() -> float:
        model.zero_grad(set_to_none=True)
        loss = model(**x["hf"], labels=x["labels"], use_cache=False).loss
        loss.backward()
        return loss.item()

    return run


def decode_ours(model, x, new_tokens: int = MAX_NEW_TOKENS) -> Callable[[], torch.Tensor]:
    from adapters.generation import SamplingConfig, generate

    model.eval()
    sampling = SamplingConfig(max_new_tokens=new_tokens)

    def run() -> torch.Tensor:
        return torch.stack(list(generate(model, x["tokens"], x["images"], sampling, stop_ids=())), dim=1)

    return run


def decode_hf(model, x, new_tokens: int = MAX_NEW_TOKENS) -> Callable[[], torch.Tensor]:
    model.eval()

    def run() -> torch.Tensor:
        with torch.inference_mode():
            out = model.generate(**x["hf"], do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        return out[:, TEXT_LEN:]

    return run


def text_multimodal(model, x) -> Callable[[], torch.Tensor]:
    model.eval()

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return model(x["text_tokens"])

    return run


def text_bare_llama(model, x) -> Callable[[], torch.Tensor]:
    lm = model.lm.eval()

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return lm(x["text_tokens"])

    return run


# name -> (which model, run builder)
MEASUREMENTS: dict[str, tuple[str, Callable]] = {
    "train_ours": ("ours", train_step_ours),
    "train_hf": ("hf", train_step_hf),
    "decode_ours": ("ours", decode_ours),
    "decode_hf": ("hf", decode_hf),
    "text_multimodal": ("ours", text_multimodal),
    "text_bare_llama": ("ours", text_bare_llama),
}


# ----------------------------------------------------------------------------------------------
# Roofline of one decoding step

ROOFLINE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ROOFLINE_BATCHES = (1, 2)
ROOFLINE_GOAL = 1.2  # ours' step time / the bandwidth bound
BANDWIDTH_BYTES = 512 << 20  # far above the L3 cache (32 MiB on the machine of the README's figures)


def memory_bandwidth(nbytes: int = BANDWIDTH_BYTES, repeats: int = 7) -> dict:
    """This machine's memory bandwidth as torch sees it, best of ``repeats`` after one warm-up, two ways: the rate
    ``torch.mv`` streams a float32 matrix of ``nbytes`` (the kernel a decoding step runs on every weight; bytes
    read), which the roofline uses, and ``dst.copy_(src)`` of ``nbytes`` (bytes read + written, STREAM's "copy")."""
    rows = 8192
    w = torch.ones(rows, nbytes // 4 // rows)
    v = torch.ones(w.shape[1])
    dst = torch.empty_like(w)
    best = {}
    for name, fn, moved in (("mv", lambda: torch.mv(w, v), nbytes), ("copy", lambda: dst.copy_(w), 2 * nbytes)):
        fn()
        best[name] = moved / min(_timed(fn)[0] for _ in range(repeats))
    return {"bytes_per_s": best["mv"], "gb_per_s": _r(best["mv"] / 1e9, 2), "copy_bytes_per_s": best["copy"],
            "copy_gb_per_s": _r(best["copy"] / 1e9, 2),
            "buffer_mib": nbytes >> 20, "threads": torch.get_num_threads(),
            "method": "torch.mv of a float32 matrix (bytes read / best time); copy: copy_ (read + write bytes)"}


def _decode_weight_names(model) -> list[str]:
    """Our parameters one decoding step reads: everything of the frozen LM (the embedding table apart, of which
    it reads one row per batch row) and of the cross-attention blocks but their K/V projections and key norm
    (those run once per image, on the prompt); not the vision encoder, the projector or the learnable image
    rows (tests/scripts/test_bench_model_roofline.py checks this list against a dispatch trace of one step)."""
    tied = model.lm.cfg.tie_embeddings  # the output matrix is the embedding table: read whole every step
    names = [f"lm.{n}" for n, _ in model.lm.named_parameters() if tied or not n.startswith("tok_embeddings.")]
    names += [f"cross_attention_layers.{n}" for n, _ in model.cross_attention_layers.named_parameters()
              if n.split(".")[-2] not in ("wk", "wv", "k_norm")]
    return names


def decode_step_bytes(model, batch: int, prompt_len: int, new_tokens: int, vision_tokens: int) -> dict:
    """Bytes one greedy decoding step reads (weights + KV cache at its mean length + cached vision K/V)."""
    params = dict(model.named_parameters())
    names = _decode_weight_names(model)
    weights = sum(params[n].numel() * params[n].element_size() for n in names)
    emb = model.lm.tok_embeddings.weight
    if not model.lm.cfg.tie_embeddings:
        weights += batch * emb.shape[1] * emb.element_size()
    lm = model.cfg.lm
    item = emb.element_size()
    mean_len = prompt_len + (new_tokens - 1) / 2  # positions the step attends to, averaged over the generation
    kv = lm.n_layers * 2 * batch * lm.n_kv_heads * lm.head_dim * mean_len * item
    vision_kv = len(model.cross_attention_layers) * 2 * batch * lm.n_kv_heads * lm.head_dim * vision_tokens * item
    total = weights + kv + vision_kv
    return {"weights": int(weights), "kv_cache_mean": int(kv), "vision_kv": int(vision_kv), "total": int(total)}


def _batch_slice(x: dict, batch: int, dtype: torch.dtype) -> dict:
    from adapters.multimodal import ImageBatch

    im = x["images"]
    images = ImageBatch(im.tiles[:batch].to(dtype), im.layouts[:batch], im.tile_mask[:batch], im.image_mask[:batch])
    hf = {k: (v[:batch].to(dtype) if v.is_floating_point() else v[:batch]) for k, v in x["hf"].items()}
    return dict(x, tokens=x["tokens"][:batch], images=images, hf=hf)


def measure_roofline(path: Path, repeats: int, warmup: int, log: Callable[[str], None]) -> dict:
    """Section 5 of the module docstring."""
    bw = memory_bandwidth()
    out: dict = {"bandwidth": bw, "goal": f"ours step_s / bound_s <= {ROOFLINE_GOAL}", "new_tokens": MAX_NEW_TOKENS,
                 "prompt_len": TEXT_LEN, "cases": {}}
    n_vis = config_summary()["vision"]["vision_tokens_per_image"]
    for dname, dtype in ROOFLINE_DTYPES.items():
        ours = load_ours(path).to(dtype).eval()
        hf = load_hf(path).to(dtype).eval()
        full = make_inputs()
        for batch in ROOFLINE_BATCHES:
            log(f"roofline: {dname}, batch {batch}")
            x = _batch_slice(full, batch, dtype)
            fns = [decode_ours(ours, x), decode_ours(ours, x, 1), decode_hf(hf, x), decode_hf(hf, x, 1)]
            times, _ = time_interleaved(fns, repeats, warmup)
            med = [statistics.median(t) for t in times]
            steps = MAX_NEW_TOKENS - 1
            ours_step, hf_step = (med[0] - med[1]) / steps, (med[2] - med[3]) / steps
            nbytes = decode_step_bytes(ours, batch, TEXT_LEN, MAX_NEW_TOKENS, n_vis)
            bound = nbytes["total"] / bw["bytes_per_s"]
            out["cases"][f"{dname}_batch{batch}"] = {
                "bytes_per_step": nbytes, "bound_step_s": _r(bound, 6),
                "ours_step_s": _r(ours_step, 6), "hf_step_s": _r(hf_step, 6),
                "ours_over_bound": _r(ours_step / bound, 3), "hf_over_bound": _r(hf_step / bound, 3),
                "ours_over_copy_bound": _r(ours_step * bw["copy_bytes_per_s"] / nbytes["total"], 3),
                "goal_met": bool(ours_step / bound <= ROOFLINE_GOAL),
                "ours_tokens_per_s": _r(batch / ours_step, 1), "hf_tokens_per_s": _r(batch / hf_step, 1),
                "bound_tokens_per_s": _r(batch / bound, 1), "ours_over_hf_tokens_per_s": _r(hf_step / ours_step, 3),
                **_spread(*times),
            }
        del ours, hf
        gc.collect()
    out["goal_met"] = all(c["goal_met"] for c in out["cases"].values())
    return out


# ----------------------------------------------------------------------------------------------
# Timing


def _timed(fn: Callable) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def time_interleaved(fns: list[Callable], repeats: int, warmup: int) -> tuple[list[list[float]], list]:
    """Warm every function up, then run them in turn, rotating the order each round, so slow phases of a
    shared CPU hit all alike. Returns the times per function and each one's last output."""
    for _ in range(warmup):
        for f in fns:
            f()
    times: list[list[float]] = [[] for _ in fns]
    outs: list = [None] * len(fns)
    for r in range(repeats):
        for k in [(r + i) % len(fns) for i in range(len(fns))]:
            t, outs[k] = _timed(fns[k])
            times[k].append(t)
    return times, outs


def time_pair(fa: Callable, fb: Callable, repeats: int, warmup: int) -> tuple[list[float], list[float], tuple]:
    (ta, tb), (oa, ob) = time_interleaved([fa, fb], repeats, warmup)
    return ta, tb, (oa, ob)


def _goal(name: str, ratio: float) -> dict:
    what, op, target = GOALS[name]
    met = ratio <= target if op == "<=" else ratio >= target
    return {"ratio": round(ratio, 4), "ratio_is": what, "goal": f"{op} {target}", "goal_met": bool(met)}


def _r(x: float, n: int = 5) -> float:
    return round(float(x), n)


NOISY_SPREAD = 1.5  # max/min of one model's runs above this: the CPU was shared, the medians are suspect


def _spread(*runs: list[float]) -> dict:
    worst = max(max(r) / min(r) for r in runs)
    return {"worst_spread_max_over_min": _r(worst, 3), "noisy": bool(worst > NOISY_SPREAD)}


# ----------------------------------------------------------------------------------------------
# Memory: each measurement in a fresh spawned process


def _rss_kib() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in KiB, from /proc (Linux)."""
    vals = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, val = line.split(":")
                vals[key] = int(val.split()[0])
    return vals["VmRSS"], vals["VmHWM"]


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _memory_worker(name: str, path: str, conn) -> None:
    try:
        torch.set_num_threads(1)  # memory only; one thread keeps the extra processes cheap on a shared CPU
        kind, builder = MEASUREMENTS[name]
        model = (load_hf if kind == "hf" else load_ours)(Path(path))
        run = builder(model, make_inputs())
        gc.collect()
        _, load_hwm = _rss_kib()  # peak while importing and loading
        reset = _reset_peak()
        before_rss, _ = _rss_kib()
        run()  # cold: the first call, so allocator caches from earlier calls do not hide its memory
        after_rss, hwm = _rss_kib()
        # ru_maxrss is not used: across fork+exec Linux keeps the forked parent image's peak in it (the parent
        # holds both models), so it overstates a spawned worker's own peak.
        peak = hwm if reset else max(hwm, load_hwm)
        conn.send({
            "peak_growth_mib": _r(max(peak - before_rss, 0) / 1024, 1),
            "rss_before_mib": _r(before_rss / 1024, 1),
            "rss_after_mib": _r(after_rss / 1024, 1),
            "process_peak_rss_mib": _r(max(hwm, load_hwm) / 1024, 1),
            "peak_source": "VmHWM after clear_refs" if reset else
            "VmHWM without reset (clear_refs unavailable): a lower bound only if loading peaked higher",
        })
    except Exception as e:  # report, do not hang the parent
        conn.send({"error": f"{type(e).__name__}: {e}"})
    finally:
        conn.close()


def measure_memory(path: Path, log: Callable[[str], None]) -> dict:
    ctx = mp.get_context("spawn")
    out = {}
    for name in MEASUREMENTS:
        log(f"memory: {name}")
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_memory_worker, args=(name, str(path), send))
        proc.start()
        send.close()
        try:
            out[name] = recv.recv()
        except EOFError:
            out[name] = {"error": "worker exited without a result"}
        proc.join()
        if proc.exitcode:
            out[name].setdefault("error", f"worker exit code {proc.exitcode}")
    return out


# ----------------------------------------------------------------------------------------------


def run_benchmark(repeats: int, warmup: int, memory: bool, log: Callable[[str], None],
                  roofline: bool = True) -> dict:
    import transformers

    torch.manual_seed(0)
    load_start = os.getloadavg()
    result: dict = {
        "benchmark": "bench_model",
        "config": config_summary(),
        "environment": {
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "torch_num_threads": torch.get_num_threads(),
            "torch_num_interop_threads": torch.get_num_interop_threads(),
            "threads_set_by_script": torch.get_num_threads() != _DEFAULT_THREADS,
            "loadavg_1_5_15_at_start": [round(v, 2) for v in load_start],
        },
        "timing": {"repeats": repeats, "warmup": warmup, "statistic": "median", "clock": "time.perf_counter",
                   "order": "ours and HF (or the two text models) alternate run by run"},
    }
    with tempfile.TemporaryDirectory(prefix="bench_model_") as tmp:
        path = Path(tmp)
        log("building the HF model and converting it to ours (same weights)")
        write_checkpoint(path)
        hf = load_hf(path)
        ours = load_ours(path)
        x = make_inputs()
        result["parameters"] = {
            "ours_total": sum(p.numel() for p in ours.parameters()),
            "ours_trainable": sum(p.numel() for p in ours.parameters() if p.requires_grad),
            "hf_total": sum(p.numel() for p in hf.parameters()),
            "hf_trainable": sum(p.numel() for p in hf.parameters() if p.requires_grad),
            "note": "HF trains the vision model, projector and the cross-attention layers; its image-token rows "
                    "live in the one (frozen) embed_tokens matrix. Ours also trains the 8 learnable embedding "
                    "rows. Our encoder has attention biases HF lacks (zero-loaded) and HF encodes the padded "
                    "tiles' positions via 9-row tile tables, ours via a 4x4 grid.",
        }

        # 1. training step
        log("training step")
        (ta, tb, t_rows), (loss_a, loss_b, _) = time_interleaved(
            [train_step_ours(ours, x), train_step_hf(hf, x), train_step_ours(ours, x, train_image_rows=True)],
            repeats, warmup)
        ours.learnable_embedding.requires_grad_(True)
        ours.eval()
        hf.eval()
        a, b = statistics.median(ta), statistics.median(tb)
        result["training_step"] = {
            "ours_s": _r(a), "hf_s": _r(b), **_goal("training_step", a / b),
            "ratio_of_min_times": _r(min(ta) / min(tb), 4), **_spread(ta, tb),
            "ours_runs_s": [_r(t) for t in ta], "hf_runs_s": [_r(t) for t in tb],
            "ours_with_trainable_image_rows_s": _r(statistics.median(t_rows)),
            "ours_with_trainable_image_rows_ratio": _r(statistics.median(t_rows) / b, 4),
            "loss_ours": _r(loss_a, 6), "loss_hf": _r(loss_b, 6),
            "what": "zero_grad(set_to_none) + forward (vision encoder included) + loss + backward; no optimiser "
                    "step; LM frozen; same trainable set (image-token rows frozen in both); ours: ImageTextTask "
                    "(head on supervised positions only), HF: labels= (head on every position)",
        }

        # 2. greedy decoding
        log("greedy decoding")
        ta, tb, (tok_a, tok_b) = time_pair(decode_ours(ours, x), decode_hf(hf, x), repeats, warmup)
        assert tok_a.shape == tok_b.shape == (BATCH, MAX_NEW_TOKENS), (tok_a.shape, tok_b.shape)
        n_new = BATCH * MAX_NEW_TOKENS
        a, b = statistics.median(ta), statistics.median(tb)
        result["decoding"] = {
            "ours_tokens_per_s": _r(n_new / a, 2), "hf_tokens_per_s": _r(n_new / b, 2),
            **_goal("decoding", (n_new / a) / (n_new / b)),
            "ratio_of_best_runs": _r(min(tb) / min(ta), 4), **_spread(ta, tb),
            "ours_s": _r(a), "hf_s": _r(b), "ours_runs_s": [_r(t) for t in ta], "hf_runs_s": [_r(t) for t in tb],
            "generated_tokens_per_run": n_new, "max_new_tokens": MAX_NEW_TOKENS, "batch": BATCH,
            "prompt_len": TEXT_LEN, "includes_prefill": True, "includes_vision_encoding": True,
            "counted": "generated tokens only (batch x max_new_tokens), no early stop",
            "greedy_token_agreement": _r((tok_a == tok_b).float().mean().item(), 4),
            "greedy_identical": bool(torch.equal(tok_a, tok_b)),
        }

        # 3. text-only forward
        log("text-only forward")
        ta, tb, (log_a, log_b) = time_pair(text_multimodal(ours, x), text_bare_llama(ours, x), repeats, warmup)
        a, b = statistics.median(ta), statistics.median(tb)
        result["text_only_forward"] = {
            "multimodal_no_images_s": _r(a), "bare_llama_s": _r(b), **_goal("text_only_forward", a / b),
            "ratio_of_min_times": _r(min(ta) / min(tb), 4), **_spread(ta, tb),
            "multimodal_runs_s": [_r(t) for t in ta], "bare_llama_runs_s": [_r(t) for t in tb],
            "logits_identical": bool(torch.equal(log_a, log_b)),
            "what": f"inference_mode forward of ({BATCH}, {TEXT_LEN}) tokens -> fp32 logits, same weights (model.lm)",
        }
        del hf, ours, x
        gc.collect()

        # 5. roofline of decoding
        if roofline:
            log("roofline of decoding")
            result["roofline"] = measure_roofline(path, repeats, warmup, log)

        # 4. memory
        if memory:
            result["memory"] = {
                "method": "each measurement once more in a fresh multiprocessing 'spawn' process: load the model "
                          "and inputs, reset the peak RSS (/proc/self/clear_refs 5), run ONE cold call; "
                          "peak_growth_mib = VmHWM after the call - VmRSS before it; process_peak_rss_mib = the "
                          "worker's own peak RSS (VmHWM over imports, loading and the call; not ru_maxrss, which "
                          "inherits the forking parent's peak); workers use 1 torch thread",
                "unit": "MiB",
                **measure_memory(path, log),
            }
        else:
            result["memory"] = {"method": "skipped (--no-memory)"}

    result["environment"]["loadavg_1_5_15_at_end"] = [round(v, 2) for v in os.getloadavg()]
    result["goals_met"] = {k: result[k]["goal_met"] for k in GOALS}
    result["all_goals_met"] = all(result["goals_met"].values())
    result["timings_reliable"] = not any(result[k]["noisy"] for k in GOALS)
    if not result["timings_reliable"]:
        result["warning"] = (f"some runs of one model differ by more than {NOISY_SPREAD}x (shared CPU?): the medians "
                             "and goal verdicts are unreliable; rerun on an idle machine, with more --repeats, or "
                             "compare ratio_of_min_times / ratio_of_best_runs")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print only the JSON result on stdout")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per measurement first")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for the timings (default: leave torch's default)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-measurement memory subprocesses")
    p.add_argument("--no-roofline", action="store_true", help="skip the decoding roofline (fp32 and bf16)")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or (args.threads is not None and args.threads < 1):
        p.error("--repeats must be >= 1, --warmup >= 0 and --threads >= 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(f"[bench_model] {msg}", file=sys.stderr, flush=True)

    with contextlib.redirect_stdout(sys.stderr):  # what libraries print (DeepSpeed's accelerator line): not the JSON
        result = run_benchmark(args.repeats, args.warmup, not args.no_memory, log, not args.no_roofline)
    if not args.json:
        for name in GOALS:
            r = result[name]
            log(f"{name}: ratio {r['ratio']} ({r['ratio_is']}), goal {r['goal']}: "
                f"{'met' if r['goal_met'] else 'MISSED'}")
        if "roofline" in result:
            for case, r in result["roofline"]["cases"].items():
                log(f"roofline {case}: ours {r['ours_over_bound']}x the bound, HF {r['hf_over_bound']}x, "
                    f"ours / HF tokens/s {r['ours_over_hf_tokens_per_s']}")
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
