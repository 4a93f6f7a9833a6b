"""Parameter counts of the real-size configs, built on the ``meta`` device (no memory, no weights).

    python -m scripts.model_stats [--json]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch

from adapters.llama import LLAMA_PRESETS, Llama
from adapters.multimodal import MultimodalLlama, multimodal_config
from adapters.video_adapter import VideoAdapterConfig
from speech.adapter import adapter_param_count
from speech.conformer import param_count as conformer_param_count
from vision.encoder import build_vision_encoder, vision_config

# Llama 3 paper, sec. 7.4: the video aggregator + video cross-attention layers have 0.6B parameters
# with the 8B LM and 4.6B with the 70B (the 11B and 90B multimodal presets).
PAPER_VIDEO_PARAMS = {"11B": 0.6e9, "90B": 4.6e9}


def count(module: torch.nn.Module, prefix: str = "") -> int:
    return sum(p.numel() for n, p in module.named_parameters() if n.startswith(prefix))


def collect() -> dict:
    stats: dict = {"llama": {}, "vision": {}, "multimodal": {}, "video": {},
                   "speech": {"conformer_1B": conformer_param_count("1B"),
                              "adapter_8B": adapter_param_count("8B"), "adapter_70B": adapter_param_count("70B")}}
    with torch.device("meta"):
        for name in ("8B", "70B", "405B"):
            stats["llama"][name] = count(Llama(LLAMA_PRESETS[name]))
        for tile in (336, 560):
            enc = build_vision_encoder(vision_config("vit_h14", tile_size=tile))
            parts = enc.param_breakdown()
            stats["vision"][f"vit_h14@{tile}"] = {
                "total": enc.num_params(),
                "vit_h14_tower": count(enc) - count(enc, "global_transformer") - count(enc, "pre_tile")
                - count(enc, "post_tile") - count(enc, "gated_positional"),
                "global_layers": count(enc, "global_transformer"),
                "breakdown": parts,
            }
        for name in ("11B", "90B", "405B"):
            cfg = multimodal_config(name)
            m = MultimodalLlama(replace(cfg), Llama(cfg.lm))
            stats["multimodal"][name] = {
                "total": count(m),
                "frozen_lm": count(m, "lm."),
                "vision_encoder": count(m, "vision."),
                "projector": count(m, "projector."),
                "cross_attention_layers": count(m, "cross_attention_layers."),
                "n_cross_attention_layers": len(m.cross_attention_layers),
                "learnable_embedding": count(m, "learnable_embedding"),
                "trainable": sum(p.numel() for p in m.parameters() if p.requires_grad),
            }
        for name, paper in PAPER_VIDEO_PARAMS.items():
            cfg = multimodal_config(name, video=VideoAdapterConfig())
            m = MultimodalLlama(cfg, Llama(cfg.lm))
            agg, xattn = count(m, "video.aggregator."), count(m, "video.cross_attention_layers.")
            stats["video"][name] = {
                "lm": f"{cfg.lm.dim}-wide, {cfg.lm.n_layers} layers",
                "aggregator": agg,
                "video_cross_attention_layers": xattn,
                "n_video_cross_attention_layers": len(m.video.cross_attention_layers),
                "total": agg + xattn,
                "paper": int(paper),
                "ratio_to_paper": round((agg + xattn) / paper, 3),
            }
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    stats = collect()
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    b = lambda n: f"{n / 1e9:7.3f}B"  # noqa: E731
    m = lambda n: f"{n / 1e6:8.1f}M"  # noqa: E731
    print("Llama 3 (frozen LM)")
    for name, n in stats["llama"].items():
        print(f"  {name:6s} {b(n)}")
    print("Image encoder (ViT-H/14 + 8 gated global layers + tile/gated position tables)")
    for name, s in stats["vision"].items():
        print(f"  {name:14s} ViT-H/14 tower {m(s['vit_h14_tower'])}  + global layers {m(s['global_layers'])}"
              f"  total {m(s['total'])}")
    print("Multimodal (paper sec. 7: cross-attention after every 4th layer)")
    for name, s in stats["multimodal"].items():
        print(f"  {name:4s} total {b(s['total'])}: frozen LM {b(s['frozen_lm'])}, vision {m(s['vision_encoder'])}, "
              f"projector {m(s['projector'])}, {s['n_cross_attention_layers']} cross-attention layers "
              f"{b(s['cross_attention_layers'])}; trainable {b(s['trainable'])}")
    print("Video adapter (one perceiver layer at the LM width + a video cross-attention block before every 4th "
          "image block)")
    for name, s in stats["video"].items():
        print(f"  {name:4s} aggregator {m(s['aggregator'])} + {s['n_video_cross_attention_layers']} video "
              f"cross-attention layers {m(s['video_cross_attention_layers'])} = {b(s['total'])} "
              f"(paper {b(s['paper'])}, x{s['ratio_to_paper']})")
    print("  The video cross-attention blocks are image blocks' copies (fixed by the paper); the aggregator's size\n"
          "  is not given. One perceiver layer scales with dim^2, so no single aggregator matches both paper\n"
          "  figures: 0.6B - 2 blocks leaves ~0.16B for the 8B LM, 4.6B - 5 blocks ~0.32B for the 70B (x2,\n"
          "  where dim^2 gives x4). Ours is a standard Flamingo layer (FFN x4): 3% over for 8B, 8% over for 70B.")
    sp = stats["speech"]
    print(f"Speech: Conformer 1B {b(sp['conformer_1B'])} (paper: about 1B); adapter {m(sp['adapter_8B'])} with the 8B "
          f"LM, {m(sp['adapter_70B'])} with the 70B (paper: about 100M)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
