"""BEST-RQ pre-training under DeepSpeed (training.speech_pretrain) on CPU with gloo: two ranks through
torch.distributed.run, resume equality in one process, the rank sampler and the named errors.

Tiny Conformer, 4 codebooks of 64 codes, six synthetic chirp clips (1 to 1.6 s) written as WAV files.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from scripts import pretrain_speech_encoder as cli
from speech.pretrain import AudioClips, load_bestrq, load_pretrained_encoder, pad_waves
from speech.features import LogMel
from training.speech_pretrain import RankClipSampler
from training.trainer import TrainError
from tests.training.ranks import free_port

ROOT = Path(__file__).resolve().parents[2]
N_CLIPS = 6
TINY = ["--preset", "tiny", "--steps", "4", "--batch-size", "2", "--warmup", "1", "--lr", "2e-3",
        "--codebooks", "4", "--codebook-size", "64", "--no-progress"]
DS = {"gradient_accumulation_steps": 2, "bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"},
      "zero_optimization": {"stage": 1}, "gradient_clipping": 1.0, "steps_per_print": 1000000}


@pytest.fixture(scope="module")
def audio(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(0)
    for i in range(N_CLIPS):
        t = np.arange(16_000 + 2_000 * i) / 16_000
        x = 0.3 * np.sin(2 * np.pi * (150 + 60 * i) * t * (1 + 0.7 * t)) + 0.05 * rng.standard_normal(len(t))
        sf.write(root / f"c{i}.wav", x.astype(np.float32), 16_000)
    (root / "ds.json").write_text(json.dumps(DS))
    return root


def clip_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_ranks_with_torchrun(audio, tmp_path):
    """Default DeepSpeed config (fp32, ZeRO-1): 4 steps x 2 clips x 2 ranks, checkpoints at steps 2 and 4."""
    out = tmp_path / "dp"
    launcher_env = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")  # set by an in-process run
    env = {k: v for k, v in os.environ.items() if k not in launcher_env}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), "-m", "scripts.pretrain_speech_encoder",
           "--audio-dir", str(audio), "--out", str(out), "--save-every", "2", *TINY]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert (report["world_size"], report["steps"], report["clips_seen"]) == (2, 4, 4 * 2 * 2)
    assert report["deepspeed"]["train_batch_size"] == 4 and report["resumed_from"] is None
    assert len(report["loss"]) == 4 and all(np.isfinite(report["loss"]))
    assert report["loss"][0] == pytest.approx(np.log(64), rel=0.15)  # chance at the start
    assert set(report["files"]) == {"encoder.safetensors", "encoder_config.json", "bestrq.safetensors",
                                    "report.json"}
    # The saved encoder loads strictly and runs; the whole BEST-RQ state too.
    encoder, bestrq = load_pretrained_encoder(out), load_bestrq(out)
    assert encoder.cfg == bestrq.encoder.cfg and (bestrq.cfg.n_codebooks, bestrq.cfg.codebook_size) == (4, 64)
    clips = AudioClips.from_folder(audio)
    mel, frames = LogMel()(*pad_waves([clips.load(i, None, np.random.default_rng(0)) for i in range(2)]))
    with torch.no_grad():
        h, _ = encoder(mel, frames)
    assert torch.isfinite(h).all()
    # Each rank drew 2 x 4 clips; within an epoch (3 clips per rank) the two ranks' clips are disjoint.
    logs = [clip_log(out / "clips" / f"rank_{r}.jsonl") for r in (0, 1)]
    assert [[e["step"] for e in log] for log in logs] == [[1, 2, 3, 4]] * 2
    by_epoch = [{} for _ in logs]
    for r, log in enumerate(logs):
        for entry in log:
            for epoch, i in entry["clips"]:
                by_epoch[r].setdefault(epoch, []).append(i)
    assert sorted(by_epoch[0]) == sorted(by_epoch[1]) == [0, 1, 2]
    for epoch in (0, 1):  # complete epochs: 3 different clips each, together all 6
        a, b = by_epoch[0][epoch], by_epoch[1][epoch]
        assert len(set(a)) == len(a) == 3 and not set(a) & set(b) and set(a) | set(b) == set(range(N_CLIPS))
    assert by_epoch[0][0] != by_epoch[0][1] or by_epoch[1][0] != by_epoch[1][1]  # reshuffled every epoch
    for step in (2, 4):
        assert all((out / "checkpoints" / f"step_{step}" / f"rank_{r}.pt").is_file() for r in (0, 1))
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_4"


def test_resume_gives_the_uninterrupted_losses(audio, tmp_path, capsys):
    """One process with --deepspeed (bf16, fp32 accumulation, 2 micro-batches per step): a run killed after
    its step-2 checkpoint and resumed has the same losses and final weights as the uninterrupted run."""
    argv = ["--audio-dir", str(audio), "--deepspeed", str(audio / "ds.json"), "--save-every", "2", *TINY]
    full = tmp_path / "full"
    assert cli.main([*argv, "--out", str(full)]) == 0
    first = json.loads((full / "report.json").read_text())
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.rindex('{\n  "format"'):]) == first  # rank 0 prints the report
    assert (first["world_size"], first["gradient_accumulation_steps"], first["clips_seen"]) == (1, 2, 16)
    assert first["deepspeed"]["bf16"]["enabled"] and all(np.isfinite(first["loss"]))

    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / "step_2", resumed / "checkpoints" / "step_2")
    (resumed / "checkpoints" / "latest").write_text("step_2")  # as if killed during step 3
    (resumed / "clips").mkdir()
    (resumed / "clips" / "rank_0.jsonl").write_text((full / "clips" / "rank_0.jsonl").read_text())
    assert cli.main([*argv, "--out", str(resumed)]) == 0
    second = json.loads((resumed / "report.json").read_text())
    assert second["resumed_from"] == 2
    assert second["loss"] == first["loss"] and second["accuracy"] == first["accuracy"]  # steps 3, 4 included
    assert clip_log(resumed / "clips" / "rank_0.jsonl") == clip_log(full / "clips" / "rank_0.jsonl")
    for name in ("encoder.safetensors", "bestrq.safetensors"):
        a, b = load_file(full / name), load_file(resumed / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name

    # The same folder with another config: a named error, not a silent mix of two runs.
    capsys.readouterr()
    assert cli.main([*argv, "--out", str(resumed), "--seed", "5"]) == 2
    err = capsys.readouterr().err
    assert str(resumed / "checkpoints" / "step_4" / "rank_0.pt") in err and "seed: 0 -> 5" in err
    assert "the checkpoint cannot honour" in err and len(err.strip().splitlines()) == 1


def test_option_and_deepspeed_config_errors_are_named(audio, tmp_path, capsys):
    base = ["--audio-dir", str(audio), "--out", str(tmp_path / "o"), *TINY]
    assert cli.main([*base, "--save-every", "2"]) == 2
    assert "--save-every needs --deepspeed" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**DS, "optimizer": {"type": "Adam"}}))
    assert cli.main([*base, "--deepspeed", str(bad)]) == 2
    assert f"{bad}: 'optimizer'" in capsys.readouterr().err
    bad.write_text(json.dumps({**DS, "train_micro_batch_size_per_gpu": 3}))
    assert cli.main([*base, "--deepspeed", str(bad)]) == 2
    assert re.search(rf"{re.escape(str(bad))}: train_micro_batch_size_per_gpu 3 contradicts --batch-size 2",
                     capsys.readouterr().err)
    assert cli.main([*base, "--deepspeed", str(tmp_path / "missing.json")]) == 2
    assert "missing.json: not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_rank_sampler_is_disjoint_reshuffled_and_resumable():
    n, world = 10, 3
    samplers = [RankClipSampler(n, r, world, seed=7) for r in range(world)]
    draws = [[s.next() for _ in range(7)] for s in samplers]  # 3 per epoch per rank (10 // 3), 1 left out
    for epoch in (0, 1):
        shares = [[i for e, i in d if e == epoch] for d in draws]
        assert all(len(s) == 3 for s in shares) and len({i for s in shares for i in s}) == 9
    assert [i for e, i in draws[0] if e == 0] != [i for e, i in draws[0] if e == 1]
    again = RankClipSampler(n, 1, world, seed=7)
    again.load_state_dict(samplers[1].state_dict())
    assert [again.next() for _ in range(5)] == [samplers[1].next() for _ in range(5)]
    with pytest.raises(TrainError, match=re.escape("<arrays>: 2 clip(s) cannot be split over 3 ranks")):
        RankClipSampler(2, 0, 3, seed=0, source="<arrays>")


def test_model_packages_import_no_distributed_code():
    for path in sorted((ROOT / "speech").glob("*.py")):
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(deepspeed|torch\.distributed)", text, re.M), path
