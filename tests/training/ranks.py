"""Helpers for the multi-process tests: a free port, N worker processes on gloo, a tiny model with open gates."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(module: str, out: Path, args: list[str], world: int = 2, timeout: float = 300) -> Path:
    """Run ``python -m module --out OUT *args`` as ``world`` ranks (RANK / WORLD_SIZE / MASTER_* env, one
    thread each); a failing rank fails the test with every rank's log tail."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = []
    for rank in range(world):
        log = open(out / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", module, "--out", str(out), *args], cwd=ROOT,
                                      env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, stdout=log,
                                      stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(codes):
        logs = "\n".join(f"--- rank {r} ---\n" + (out / f"rank{r}.log").read_text()[-3000:] for r in range(world))
        pytest.fail(f"{module} workers exited with {codes}:\n{logs}")
    return out


def open_gates(model):
    """Non-zero gates: fresh ones (0) would give the encoder and cross-attention no say and no gradient."""
    with torch.no_grad():
        for blk in model.cross_attention_layers:
            blk.gate_attn.fill_(0.5)
            blk.gate_ffwd.fill_(-0.5)
        model.vision.gated_positional_embedding_gate.fill_(0.5)
    return model
