"""The lowest layer: strict config <-> dict, presets, export files, JSONL, WER / CER, RoPE. Imports nothing of ours;
knows no media decoding, no model package and no training."""
