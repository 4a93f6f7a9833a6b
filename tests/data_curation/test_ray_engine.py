"""The curation engine on Ray: a real two-node cluster, a driver killed half-way, an unreachable address.

The two-node cluster is two Ray nodes on this machine (``ray.cluster_utils.Cluster``: a head and a second
node, one CPU each, processes this test starts and stops); the build is the command line a user runs, with
``--address``."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from data_curation.curation_config import load_config
from data_curation.shards import build_shards

ROOT = Path(__file__).resolve().parents[2]
CONFIG = {"samples_per_shard": 2, "workers": 2, "image": {"min_side": 1}, "language": None, "ocr": None,
          "clip": None, "dedup": None, "resample": {"vocab": None, "t": 2, "keep_unmatched": True},
          "safety": {"blur_faces": False}}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / f"im{i:02d}.jpg")
        (root / f"im{i:02d}.txt").write_text(f"a photo of noise number {i} with a cat" if i % 3 else "img")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (root / "broken.txt").write_text("a broken photo of a cat")
    return root


def _config(tmp_path, **over):
    path = tmp_path / "curation.yaml"
    cfg = {**CONFIG, **over}
    cfg["resample"] = {**cfg["resample"], "vocab": str(_vocab(tmp_path))}
    path.write_text(yaml.safe_dump(cfg))
    return path


def _vocab(tmp_path):
    (tmp_path / "vocab.txt").write_text("photo\ncat\nnoise\n")
    return tmp_path / "vocab.txt"


def _cli(*args, timeout=600, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "scripts.build_shards", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=timeout, **kw)


def _output(out):
    """What a build wrote, the run's timings aside: every shard's members and every status row."""
    import tarfile

    members, rows = {}, []
    for f in sorted(out.glob("shard_*.tar")):
        with tarfile.open(f) as tar:
            members |= {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for f in sorted(out.glob("shard_*.parquet")):
        rows += pq.read_table(f).to_pylist()
    return members, rows


def test_a_build_on_a_two_node_cluster_uses_both_nodes_and_equals_the_local_build(corpus, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from data_curation import engine

    cfg_file = _config(tmp_path)
    local = build_shards(corpus, tmp_path / "local", load_config(cfg_file), progress=False)
    ray.shutdown()  # this process's local instance: the cluster below is a separate one
    engine.connect._address = None
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        run = _cli(corpus, tmp_path / "cluster", "--config", cfg_file, "--address", cluster.address, "--json")
        assert run.returncode == 0, run.stderr[-3000:]
        report = json.loads(run.stdout)
        nodes = {node.node_id for node in cluster.list_all_nodes()}
    finally:
        cluster.shutdown()
    by_node = report["engine"]["chunks_by_node"]
    assert len(by_node) == 2 and sum(by_node.values()) == 7, by_node  # 13 inputs in chunks of 2
    assert set(by_node) == nodes  # the head and the second node
    assert _output(tmp_path / "cluster") == _output(tmp_path / "local")
    assert report["counts"] == local.counts and report["by_reason"] == local.report["by_reason"]


def test_a_driver_killed_half_way_resumes_without_losing_or_doubling_a_sample(corpus, tmp_path):
    cfg_file = _config(tmp_path, safety={"blur_faces": False, "classifier": "tests.data_curation.stage_hooks:slow"},
                       workers=1)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "scripts.build_shards", str(corpus), str(out), "--config",
                             str(cfg_file), "--json"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not list((out / "_work").glob("chunk_*.parquet")) and time.time() < deadline:
            assert proc.poll() is None, "the build ended before it could be killed"
            time.sleep(0.1)
        assert proc.poll() is None
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray instance it started
        proc.wait()
    done = len(list((out / "_work").glob("chunk_*.parquet")))
    assert 1 <= done < 7 and not (out / "report.json").exists()
    resumed = _cli(corpus, out, "--config", cfg_file, "--json")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    fresh = build_shards(corpus, tmp_path / "fresh", load_config(cfg_file), progress=False)
    members, rows = _output(out)
    assert (members, rows) == _output(tmp_path / "fresh")
    assert sorted(r["key"] for r in rows) == sorted({r["key"] for r in rows}) and len(rows) == fresh.n_inputs == 13


def test_an_unreachable_address_is_one_line_and_no_wait(corpus, tmp_path):
    t0 = time.perf_counter()
    run = _cli(corpus, tmp_path / "o", "--config", _config(tmp_path), "--address", "127.0.0.1:1", timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [run.stderr.strip()]
    assert "cannot reach the Ray cluster at '127.0.0.1:1'" in run.stderr
    assert time.perf_counter() - t0 < 30
    run = _cli(corpus, tmp_path / "o", "--config", _config(tmp_path), "--address", "nowhere")
    assert run.returncode == 2 and "is not 'auto', host:port or ray://host:port" in run.stderr


def test_stages_share_an_operator_unless_a_gpu_splits_the_model_stages(tmp_path):
    """Ray Data's fusion rule: one CPU operator for the whole chain on CPUs; with GPUs, CLIP and SSCD form a
    GPU operator between the CPU ones (the GPU path itself needs a GPU to run)."""
    from data_curation.engine import operator_groups
    from data_curation.shards import image_stages

    cfg = load_config(None, {"dedup": {"sscd": "unused.pt"}})
    stages = image_stages(cfg, tmp_path)
    names = lambda groups: [([s.name for s in group], gpu) for group, gpu in groups]  # noqa: E731
    assert names(operator_groups(stages, gpus=False)) == [
        (["prepare", "safety", "ocr", "clip", "sscd", "write"], False)]
    assert names(operator_groups(stages, gpus=True)) == [
        (["prepare", "safety", "ocr"], False), (["clip", "sscd"], True), (["write"], False)]
