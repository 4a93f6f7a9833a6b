"""training.trainer through DeepSpeed on CPU (gloo): one process in-process, two through torch.distributed.run.

Tiny model (the "tiny" preset, random frozen LM), tiny shards of solid colours; bf16 with fp32
gradient accumulation (ZeRO-1), as in the shipped config.
"""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from adapters.model_io import load_checkpoint
from adapters.tokenizer import Tokenizer
from common.config import config_to_dict
from scripts import demo_vqa, train_image_adapter
from training.config import load_run_config
from training.resolution import resize_grid_tokens
from training.trainer import RankStateError, TrainError, build_model, load_rank_state, train, truncate_steps
from tests.tiny import build_tiny_tokenizer
from tests.training.ranks import free_port
from tests.training.test_data import caption_texts, make_image_shards

DS = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2, "bf16": {"enabled": True},
      "data_types": {"grad_accum_dtype": "fp32"}, "zero_optimization": {"stage": 1}, "gradient_clipping": 1.0,
      "steps_per_print": 1000000}


def run_config(root: Path, run: str, *extra: str):
    return load_run_config(None, [
        f"data.shards={root}/shard_{{00000..00002}}.tar", f"model.tokenizer={root}/tokenizer.model",
        f"train.run_dir={root / run}", "train.steps=6", "train.save_every=3", "train.progress=false",
        "optim.lr=3e-3", "optim.warmup=1", "data.max_tokens=96", "data.max_rows=4", "data.max_seq_len=40",
        f"deepspeed={root}/ds.json", *extra])


def torchrun_trainer(config: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node N -m scripts.train_image_adapter --config CONFIG``, which must succeed."""
    env = {**os.environ, "PYTHONPATH": str(Path.cwd()), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), "-m", "scripts.train_image_adapter", "--config", str(config)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    """A 6-step single-process run (checkpoints at steps 3 and 6) and its export."""
    root = tmp_path_factory.mktemp("train")
    make_image_shards(root)
    build_tiny_tokenizer(root, texts=caption_texts())
    (root / "ds.json").write_text(json.dumps(DS))
    cfg = run_config(root, "run")
    return root, cfg, train(cfg)


def test_losses_fall_and_the_frozen_lm_is_untouched(stage1):
    root, cfg, result = stage1
    losses = [result.losses[s] for s in range(1, 7)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] - 0.1
    fresh = build_model(cfg, Tokenizer(cfg.model.tokenizer))  # same seed: the LM the run started from
    trained = load_checkpoint(result.export_dir)
    for (name, want), (_, got) in zip(fresh.lm.state_dict().items(), trained.lm.state_dict().items()):
        # DeepSpeed's bf16 mode holds the LM in bf16; the export is fp32 of exactly those values.
        assert torch.equal(got, want.bfloat16().float()), name
    moved = [n for n, p in fresh.trainable_named_parameters() if not torch.equal(p, trained.get_parameter(n))]
    assert any(n.startswith("cross_attention_layers.") for n in moved)
    log = [json.loads(line) for line in (root / "run" / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7)) and (root / "run" / "tensorboard").is_dir()
    assert yaml.safe_load((root / "run" / "config.yaml").read_text()) == json.loads(json.dumps(config_to_dict(cfg)))
    assert json.loads((root / "run" / "deepspeed.json").read_text())["train_batch_size"] == 2


def test_checkpoint_holds_no_frozen_lm_tensor(stage1):
    root, cfg, _ = stage1
    step = root / "run" / "checkpoints" / "step_3"
    module = torch.load(step / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    fresh = build_model(cfg, Tokenizer(cfg.model.tokenizer))
    trainable = {f"model.{n}" for n, _ in fresh.trainable_named_parameters()}
    assert set(module) == trainable and not any(k.startswith("model.lm.") for k in module)
    state = load_rank_state(step / "rank_0.pt", 1, ("run", "data", "rng"))  # weights_only=True
    assert state["run"]["optim"]["lr"] == cfg.optim.lr and state["run"]["deepspeed_config"]["train_batch_size"] == 2


def copy_run(src: Path, dst: Path, tag: str) -> Path:
    """``dst`` as ``src`` would be had it stopped after checkpoint ``tag``."""
    shutil.copytree(src / "checkpoints" / tag, dst / "checkpoints" / tag)
    (dst / "checkpoints" / "latest").write_text(tag)
    for name in ("config.yaml", "deepspeed.json", "losses.jsonl"):
        shutil.copy(src / name, dst / name)
    return dst


def test_resume_continues_with_the_uninterrupted_losses(stage1):
    root, cfg, result = stage1
    copy_run(root / "run", root / "run_resumed", "step_3")  # as if the run had been killed logging step 6:
    logged = (root / "run" / "losses.jsonl").read_text().splitlines()
    (root / "run_resumed" / "losses.jsonl").write_text("\n".join(logged[:5]) + "\n" + logged[5][:20])
    resumed = train(replace(cfg, train=replace(cfg.train, run_dir=str(root / "run_resumed"), export=False)))
    assert sorted(resumed.losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed.losses[step] == result.losses[step], step
    log = [json.loads(line) for line in (root / "run_resumed" / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]  # steps 4 and 5 redone, written once
    assert [r["loss"] for r in log] == [result.losses[s] for s in range(1, 7)]


def test_resume_refuses_config_changes_the_checkpoint_cannot_honour(stage1, tmp_path, capsys):
    root, cfg, _ = stage1
    run = copy_run(root / "run", tmp_path / "run", "step_6")
    cfg = replace(cfg, train=replace(cfg.train, run_dir=str(run), export=False))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(config_to_dict(cfg)))))
    saved_config = (run / "config.yaml").read_bytes()
    argv = ["--config", str(tmp_path / "run.yaml"), "--set", "optim.lr=0.001", "--set", "data.seed=1",
            "--set", "train.steps=7"]
    assert train_image_adapter.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{run / 'checkpoints' / 'step_6'}: the checkpoint cannot honour" in err
    assert "optim.lr: 0.003 -> 0.001" in err and "data.seed: 0 -> 1" in err and "train.steps" not in err
    assert (run / "config.yaml").read_bytes() == saved_config  # nothing written for a refused resume

    # A longer run is a change the checkpoint can honour: applied, logged, recorded in config.yaml.
    out = train(replace(cfg, train=replace(cfg.train, steps=7)))
    assert sorted(out.losses) == [7]
    err = capsys.readouterr().err
    assert "step_6: applying" in err and "train.steps: 6 -> 7" in err
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 7
    log = [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 8))


def test_resume_runs_no_code_from_a_tampered_rank_file(stage1, tmp_path, capsys):
    root, cfg, _ = stage1
    run = copy_run(root / "run", tmp_path / "run", "step_6")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('ran')",)

    torch.save({"run": {}, "data": {}, "rng": Payload()}, run / "checkpoints" / "step_6" / "rank_0.pt")
    cfg = replace(cfg, train=replace(cfg.train, run_dir=str(run)))
    with pytest.raises(RankStateError, match=r"rank_0\.pt: refused.*Unsupported global: GLOBAL exec"):
        train(cfg)
    assert not marker.exists()
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(config_to_dict(cfg)))))
    assert train_image_adapter.main(["--config", str(tmp_path / "run.yaml")]) == 2
    assert "rank_0.pt: refused" in capsys.readouterr().err and not marker.exists()
    torch.load(run / "checkpoints" / "step_6" / "rank_0.pt", weights_only=False)  # what resume used to do
    assert marker.read_text() == "ran"  # the payload is live: the refusal above is what kept it from running


def test_export_answers_in_demo_vqa(stage1, capsys):
    root, _, result = stage1
    from PIL import Image

    Image.new("RGB", (60, 40), (220, 30, 30)).save(root / "red.png")
    argv = ["--image", str(root / "red.png"), "--question", "Describe the image.", "--checkpoint",
            str(result.export_dir), "--max-new-tokens", "4"]
    assert demo_vqa.main(argv) == 0
    out = capsys.readouterr().out
    assert out.strip() and out.endswith("\n")


def test_stage2_anneals_at_a_higher_tile_size(stage1):
    root, cfg, result = stage1
    table = torch.randn(2, 2, 17, 8)
    assert torch.equal(resize_grid_tokens(table, 4), table)
    flat = torch.ones(2, 2, 17, 8)  # a constant table stays constant; CLS is kept
    assert torch.allclose(resize_grid_tokens(flat, 6), torch.ones(2, 2, 37, 8))
    cfg2 = run_config(root, "stage2", f"model.init_from={result.export_dir}", "model.tile_size=84", "train.steps=2",
                      "train.save_every=2")
    out = train(cfg2)
    model = load_checkpoint(out.export_dir)
    assert model.cfg.vision.tile_size == 84 and model.vision.positional_embedding.shape[0] == 37
    assert all(torch.isfinite(torch.tensor(list(out.losses.values()))))


def test_init_from_an_export_whose_lm_moved_finds_it_through_model_lm(stage1, tmp_path):
    from adapters.checkpoint import save_meta_checkpoint
    from adapters.llama import build_llama, llama_config
    from adapters.model_io import LMMismatchError, save_checkpoint
    from adapters.multimodal import build_multimodal, multimodal_config

    root, cfg, _ = stage1
    tok = Tokenizer(cfg.model.tokenizer)
    torch.manual_seed(1)
    lm = build_llama(replace(llama_config("tiny"), vocab_size=tok.n_words))
    save_meta_checkpoint(lm, tmp_path / "lm")
    image = build_multimodal(replace(multimodal_config("tiny"), lm=lm.cfg), lm)
    save_checkpoint(image, tmp_path / "export", lm_path=str(tmp_path / "lm"))
    moved = shutil.move(tmp_path / "lm", tmp_path / "moved")
    with pytest.raises(LMMismatchError, match="--lm"):
        build_model(run_config(root, "lost", f"model.init_from={tmp_path / 'export'}"), tok)
    model = build_model(run_config(root, "found", f"model.init_from={tmp_path / 'export'}", f"model.lm={moved}"), tok)
    assert torch.equal(model.lm.tok_embeddings.weight, lm.tok_embeddings.weight)


def test_row_packing_trains_and_is_refused_where_it_cannot_work(stage1):
    root, cfg, _ = stage1
    packed = run_config(root, "packed", "data.pack_rows=true", "data.max_seq_len=80", "data.max_tokens=160",
                        "data.max_rows=2", "train.steps=2", "train.save_every=2")
    out = train(replace(packed, train=replace(packed.train, export=False)))
    assert sorted(out.losses) == [1, 2] and all(torch.isfinite(torch.tensor(list(out.losses.values()))))
    log = [json.loads(line) for line in (root / "packed" / "losses.jsonl").read_text().splitlines()]
    assert log[0]["tokens"] > 0
    from training.config import TrainConfigError

    for extra in (["kind=speech"], ["parallel=pipeline"]):
        with pytest.raises(TrainConfigError, match="data.pack_rows"):
            run_config(root, "x", "data.pack_rows=true", *extra)


def test_bad_config_and_missing_shard_exit_2(stage1, capsys):
    root, _, _ = stage1
    bad = root / "bad.yaml"
    bad.write_text("kind: image\ndata:\n  shardz: x.tar\n")
    assert train_image_adapter.main(["--config", str(bad)]) == 2
    assert "bad.yaml: unknown key data.shardz" in capsys.readouterr().err
    good = root / "good.yaml"
    good.write_text(yaml.safe_dump({"kind": "image", "deepspeed": str(root / "ds.json"), "data": {
        "shards": f"{root}/shard_{{00000..00004}}.tar"}, "model": {"tokenizer": str(root / "tokenizer.model")},
        "train": {"run_dir": str(root / "missing"), "progress": False}}))
    assert train_image_adapter.main(["--config", str(good)]) == 2
    assert "shard_00003.tar not found" in capsys.readouterr().err


def test_two_processes_data_parallel(stage1, tmp_path):
    """torch.distributed.run with 2 gloo ranks: finite falling losses, per-rank data states, one export.

    (Resume equality is checked in one process above; a second 2-rank launch would double this test's ~45 s.)
    """
    root, _, _ = stage1
    cfg = {"kind": "image", "deepspeed": str(root / "ds.json"),
           "model": {"tokenizer": str(root / "tokenizer.model")},
           "data": {"shards": f"{root}/shard_{{00000..00002}}.tar", "max_tokens": 96, "max_rows": 4,
                    "max_seq_len": 40},
           "optim": {"lr": 3e-3, "warmup": 1},
           "train": {"steps": 4, "save_every": 2, "run_dir": str(tmp_path / "dp"), "progress": False}}
    (tmp_path / "dp.yaml").write_text(yaml.safe_dump(cfg))
    done = torchrun_trainer(tmp_path / "dp.yaml")
    summary = json.loads(done.stdout.strip().splitlines()[-1])  # rank 0 only prints it
    assert summary["last_step"] == 4 and summary["export"] == str(tmp_path / "dp" / "export")
    log = [json.loads(line) for line in (tmp_path / "dp" / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and log[-1]["loss"] < log[0]["loss"]
    assert all(torch.isfinite(torch.tensor([r["loss"] for r in log])))
    assert json.loads((tmp_path / "dp" / "deepspeed.json").read_text())["train_batch_size"] == 4
    step = tmp_path / "dp" / "checkpoints" / "step_2"
    states = [load_rank_state(step / f"rank_{r}.pt", 2, ("data",))["data"] for r in (0, 1)]
    assert all(s["samples_delivered"] > 0 for s in states)
    module = torch.load(step / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert module and not any(k.startswith("model.lm.") for k in module)
    load_checkpoint(tmp_path / "dp" / "export")


def test_video_from_the_image_export_and_speech_from_audio_shards(stage1, tmp_path):
    """The other two kinds through the same trainer: 2 steps each, finite losses, loadable exports."""
    import io

    import numpy as np
    import soundfile as sf
    import webdataset as wds

    from speech.model_io import load_speech_checkpoint
    from synthetic.motion import make_motion_clips

    root, _, result = stage1
    clips = make_motion_clips(2, seed=0, max_frames=9)
    rng = np.random.default_rng(0)
    for s in range(2):
        with wds.TarWriter(str(tmp_path / f"v_{s:05d}.tar")) as w:
            w.write({"__key__": f"v{s}", "mp4": clips[s].video, "txt": "a red square"})
        with wds.TarWriter(str(tmp_path / f"a_{s:05d}.tar")) as w:
            buf = io.BytesIO()
            sf.write(buf, (0.1 * rng.standard_normal(4000)).astype(np.float32), 16000, format="FLAC")
            w.write({"__key__": f"a{s}", "flac": buf.getvalue(), "txt": "a red square"})
    common = ["train.steps=2", "train.save_every=2", "data.max_seq_len=96", "data.max_tokens=96"]
    video = train(run_config(root, "video", "kind=video", f"model.init_from={result.export_dir}",
                             "model.num_frames=4", f"data.shards={tmp_path}/v_{{00000..00001}}.tar", *common))
    model = load_checkpoint(video.export_dir)
    assert model.video is not None and model.cfg.video.max_frames == 4
    speech = train(run_config(root, "speech", "kind=speech", f"data.shards={tmp_path}/a_{{00000..00001}}.tar",
                              *common))
    load_speech_checkpoint(speech.export_dir)
    for r in (video, speech):
        assert sorted(r.losses) == [1, 2] and all(torch.isfinite(torch.tensor(list(r.losses.values()))))


def test_tensor_parallel_run_tracks_the_single_process_run(stage1, tmp_path):
    """tensor_parallel=2 on 2 ranks (data-parallel world 1: the same batches as the one-process run), with the
    image encoder's tokens split over the same 2 ranks (encoder_sequence_parallel): every LM and cross-attention
    layer is sharded, yet the losses follow the unsharded run's up to bf16 rounding of the partial sums, and the
    export holds the same frozen LM, bitwise."""
    root, cfg, result = stage1
    tp_cfg = run_config(root, "tp", "tensor_parallel=2", "encoder_sequence_parallel=true", "train.save_every=6")
    tp_cfg = replace(tp_cfg, train=replace(tp_cfg.train, run_dir=str(tmp_path / "tp")))
    (tmp_path / "tp.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(config_to_dict(tp_cfg)))))
    torchrun_trainer(tmp_path / "tp.yaml")
    log = [json.loads(line) for line in (tmp_path / "tp" / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    for r in log:  # same batches, schedule and seeds as the one-process run
        assert abs(r["loss"] - result.losses[r["step"]]) < 0.02 * result.losses[r["step"]], (r, result.losses)
    assert log[0]["tokens"] == json.loads((root / "run" / "losses.jsonl").read_text().splitlines()[0])["tokens"]
    tp_model, ref = load_checkpoint(tmp_path / "tp" / "export"), load_checkpoint(result.export_dir)
    assert tp_model.cfg == ref.cfg
    for (name, a), (_, b) in zip(tp_model.lm.state_dict().items(), ref.lm.state_dict().items()):
        assert torch.equal(a, b), name
    from training.config import TrainConfigError

    with pytest.raises(TrainConfigError, match="tensor_parallel"):
        run_config(root, "x", "tensor_parallel=2", "kind=speech")
    with pytest.raises(TrainConfigError, match="encoder_sequence_parallel.*needs tensor_parallel > 1"):
        run_config(root, "x", "encoder_sequence_parallel=true")


def test_pipeline_mode_through_the_entry_point(stage1, tmp_path):
    """`--parallel pipeline` on 2 ranks (2 stages of the tiny model): the trainer's checkpoints, log and
    export work in pipeline mode too (the pipeline's numerics are checked in test_pipeline.py)."""
    root, _, result = stage1
    cfg = run_config(root, "pipe", "parallel=pipeline", "pipeline_stages=2", "train.steps=2", "train.save_every=2")
    cfg = replace(cfg, train=replace(cfg.train, run_dir=str(tmp_path / "pipe")))
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(config_to_dict(cfg)))))
    torchrun_trainer(tmp_path / "pipe.yaml")
    log = [json.loads(line) for line in (tmp_path / "pipe" / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(torch.isfinite(torch.tensor([r["loss"] for r in log])))
    assert (tmp_path / "pipe" / "checkpoints" / "step_2").is_dir()
    assert load_checkpoint(tmp_path / "pipe" / "export").cfg == load_checkpoint(result.export_dir).cfg


def test_step_logs_keep_each_step_once_and_rank_states_are_checked(tmp_path):
    log = tmp_path / "losses.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    truncate_steps(log, 2)  # the cut-short last line is the write a kill interrupted
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]
    log.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(TrainError, match=r"losses\.jsonl: line 2 is not JSON"):
        truncate_steps(log, 2)
    torch.save({"data": {}}, tmp_path / "rank_0.pt")
    with pytest.raises(RankStateError, match=r"rank_0\.pt: no run, rng"):
        load_rank_state(tmp_path / "rank_0.pt", 1, ("run", "data", "rng"))
    with pytest.raises(RankStateError, match=r"rank_1\.pt: missing \(saved with another world size than 2"):
        load_rank_state(tmp_path / "rank_1.pt", 2, ("data",))
