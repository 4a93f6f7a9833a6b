"""The engine every shard builder runs on: Ray Data.

A builder hands ``run_stages`` its chunks (``samples_per_shard`` inputs each, one shard each) and a list of
``Stage`` s. Consecutive stages with the same resources share one Ray Data operator (``operator_groups``,
Ray Data's own rule for fusing maps): on CPUs the whole chain is one operator; with GPUs the model stages
(CLIP, SSCD) form a GPU operator between CPU ones, and chunk ``k + 1`` is decoded while CLIP scores chunk
``k``. Each operator runs ``workers`` at a time, one chunk (a batch) per call, and every stage's model
(language id, face detector and safety classifier, CLIP, SSCD, the video and audio models) loads once per
worker: a GPU operator is a pool of actors holding their models; a CPU operator runs as tasks in Ray's
reused worker processes, each of which builds a stage once and keeps it (``_built``), so a second job in
the same Ray session starts warm. The last stage writes the chunk's files from the worker that holds it.
Each stage times itself; ``StageTimes`` sums what every chunk reports so the report can give each stage's
throughput.

Where it runs: ``address=None`` starts (or reuses) a Ray instance inside this process, nothing to install or
start by hand; ``"auto"`` or ``"ray://host:port"`` (or a head's ``host:port``) joins a running cluster. On a
cluster every node must see the input and output folders at the same paths (a shared file system), as in
video2dataset or NeMo Curator.

What a crash costs: a stage that raises on one sample fails that sample (the builders catch per sample). A
worker process that dies (a decoder that segfaults, a stage killed for memory) loses the chunk it held:
Ray Data records the chunk as failed instead of ending the job (``max_errored_blocks``), and once the
stream has drained, every such chunk runs again one sample and one stage at a time in an actor Ray restarts
when it dies (``_isolated``); a sample whose stage kills it again gets an ``error`` record naming the stage
and the crash, and the rest of its chunk is written as usual. Nothing is retried blindly: a deterministic
crash would only crash again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import socket
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm


class ClusterError(RuntimeError):
    """The Ray cluster named by ``--address`` cannot be reached or used."""


@dataclass(frozen=True)
class Stage:
    """One step of a builder's pipeline: ``make(cfg, device)`` builds the stage's callable once per worker
    (``device`` is ``"cuda"`` when the actor holds a GPU, else ``"cpu"``); the callable maps a chunk's items to
    the same number of items, in order (it is given the chunk's index too: the writer needs it). ``model``: the
    stage runs a neural network, so it asks Ray for a GPU when the cluster has one."""

    name: str
    make: Callable[[Any, str], Callable[[int, list], list]]
    model: bool = False


class StepClock:
    """The steps inside one stage, timed (the video and audio processors run all their steps in one stage):
    ``enter(sample, step)`` sets ``sample.stage`` and starts ``step``'s clock, ending the running step;
    ``stop()`` ends it; ``take()`` -> ``{step: (seconds, samples that entered it)}`` since the last take. A
    stage function with a ``clock`` attribute has its steps in the report as ``stage:step``."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}
        self._items: dict[str, int] = {}
        self._running: tuple[str, float] | None = None

    def enter(self, sample: Any, step: str) -> None:
        self.stop()
        sample.stage = step
        self._running = (step, time.perf_counter())
        self._items[step] = self._items.get(step, 0) + 1

    def stop(self) -> None:
        if self._running is not None:
            step, t0 = self._running
            self._seconds[step] = self._seconds.get(step, 0.0) + time.perf_counter() - t0
            self._running = None

    def take(self) -> dict[str, tuple[float, int]]:
        self.stop()
        out = {step: (self._seconds.get(step, 0.0), n) for step, n in self._items.items()}
        self._seconds, self._items = {}, {}
        return out


@dataclass
class StageTimes:
    """Seconds each stage spent (summed over its workers), the items it saw, and the chunks each Ray node
    ran (by node id)."""

    seconds: dict[str, float] = field(default_factory=dict)
    items: dict[str, int] = field(default_factory=dict)
    chunks_by_node: dict[str, int] = field(default_factory=dict)

    def add(self, times: dict[str, tuple[float, int, str]]) -> None:
        for node in {node for _, _, node in times.values()}:
            self.chunks_by_node[node] = self.chunks_by_node.get(node, 0) + 1
        for name, (s, n, _) in times.items():
            self.seconds[name] = self.seconds.get(name, 0.0) + s
            self.items[name] = self.items.get(name, 0) + n

    def report(self, unit: str) -> dict:
        """``{"stages": {stage: {"seconds": s, "items": n, f"{unit}s_per_s_per_worker": n / s}},
        "chunks_by_node": {node id: chunks}}``: the throughput of one worker of each stage (the slowest stage
        bounds the build) and where the chunks ran, for this run's chunks."""
        return {"stages": {name: {"seconds": round(s, 3), "items": self.items[name],
                                  f"{unit}s_per_s_per_worker": round(self.items[name] / s, 2) if s > 0 else None}
                           for name, s in self.seconds.items()},
                "chunks_by_node": dict(sorted(self.chunks_by_node.items()))}


# ---------------------------------------------------------------------------------------------- Ray session


def _ray():
    import ray

    return ray


def connect(address: str | None, workers: int) -> None:
    """Join ``address``'s cluster, or start a local instance with at least ``workers`` CPUs (reused for the
    rest of the process: starting Ray takes seconds). An unreachable address is a ``ClusterError``."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a whole number >= 1, got {workers!r}")
    check_address(address)
    ray = _ray()
    if ray.is_initialized():
        current = getattr(connect, "_address", None)
        if current == address and (address is not None or ray.cluster_resources().get("CPU", 0) >= workers):
            return
        ray.shutdown()
    env = {"env_vars": {"PYTHONPATH": os.pathsep.join(_import_roots())}}
    try:
        if address is None:
            # "local": a new instance even where RAY_ADDRESS names a cluster (only --address joins one)
            ray.init(address="local", num_cpus=max(workers, os.cpu_count() or 1), include_dashboard=False,
                     log_to_driver=False, configure_logging=False, runtime_env=env)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False, runtime_env=env)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise ClusterError(f"cannot reach the Ray cluster at {address!r}: {str(e).splitlines()[0]} (start one "
                           "with `ray start --head`, or leave --address out to run on this machine)") from None
    connect._address = address  # type: ignore[attr-defined]
    # the chunk references are Python objects, not Arrow values: Ray Data says so once per job, on purpose here
    logging.getLogger("ray.data._internal.tensor_extensions.arrow").setLevel(logging.ERROR)


def check_address(address: str | None, timeout: float = 5.0) -> None:
    """A ``ClusterError`` now, before any work, when ``address`` names a host and port that nothing answers
    on (Ray itself would retry for minutes) or is not an address at all. ``None`` and ``"auto"`` pass (Ray
    finds ``"auto"``'s cluster itself, or says at once that there is none)."""
    if address is None or address == "auto":
        return
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"--address {address!r} is not 'auto', host:port or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise ClusterError(f"cannot reach the Ray cluster at {address!r}: {e} (start one with `ray start --head`, "
                           "or leave --address out to run on this machine)") from None


def _import_roots() -> list[str]:
    """The folders this code is imported from, for the Ray workers' ``PYTHONPATH`` (an editable install or a
    checkout run with ``PYTHONPATH`` would otherwise not be importable by workers started elsewhere)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return list(dict.fromkeys([here, *extra]))


def cluster_has_gpus() -> bool:
    return _ray().cluster_resources().get("GPU", 0) > 0


# ---------------------------------------------------------------------------------------------- operators


_BUILT: dict[bytes, Callable] = {}  # this worker process's built stages (see _built)
_KEEP_BUILT = 8


def _built(stage: Stage, cfg: Any, device: str) -> Callable:
    """``stage.make(cfg, device)``, once per worker process for as long as the process lives: Ray reuses its
    worker processes across tasks and jobs, so a model loads once per worker, not once per chunk. The last
    ``_KEEP_BUILT`` (stage, config, device) are kept; the config's worker count and chunk size build no
    stage differently, so they are not part of the key."""
    same = cfg
    if dataclasses.is_dataclass(cfg) and hasattr(cfg, "workers") and hasattr(cfg, "samples_per_shard"):
        same = dataclasses.replace(cfg, workers=1, samples_per_shard=1)
    key = pickle.dumps((stage, same, device))
    fn = _BUILT.pop(key, None)
    if fn is None:
        import torch

        torch.set_num_threads(1)  # one thread per worker: the workers are the parallelism
        fn = stage.make(cfg, device)
    _BUILT[key] = fn  # most recent last
    while len(_BUILT) > _KEEP_BUILT:
        _BUILT.pop(next(iter(_BUILT)))
    return fn


def build_stages(stages: list[Stage], cfg: Any) -> None:
    """Builds every stage once, on a CPU worker, before any chunk is sent (the worker keeps them: ``_built``):
    a stage that cannot be set up raises its own error here, once."""
    ray = _ray()
    try:
        ray.get(ray.remote(max_retries=0)(_build_all).remote(stages, cfg))
    except Exception as e:
        raise _setup_error(e) from None


def _build_all(stages: list[Stage], cfg: Any) -> None:
    for stage in stages:
        _built(stage, cfg, "cpu")


def _run_chunk(payload: Any, fns: list[tuple[str, Callable]]) -> bytes:
    if not isinstance(payload, bytes):  # the first operator: a chunk the driver put in the object store
        payload = _ray().get(payload)
    index, items, times = pickle.loads(payload)
    node = _ray().get_runtime_context().get_node_id()
    for name, fn in fns:
        t0 = time.perf_counter()
        items = fn(index, items)
        times[name] = (time.perf_counter() - t0, len(items), node)
        clock = getattr(fn, "clock", None)
        if clock is not None:
            times |= {f"{name}:{step}": (sec, n, node) for step, (sec, n) in clock.take().items()}
    return pickle.dumps((index, items, times), protocol=pickle.HIGHEST_PROTOCOL)


def _cpu_operator(batch: dict[str, np.ndarray], stages: list[Stage], cfg: Any) -> dict[str, np.ndarray]:
    """A CPU operator's task: its stages (built once per worker process, ``_built``) on each chunk."""
    fns = [(stage.name, _built(stage, cfg, "cpu")) for stage in stages]
    return {"payload": np.array([_run_chunk(p, fns) for p in batch["payload"]], dtype=object)}


class _GpuOperator:
    """A GPU operator's actor: holds its GPU and its stages' models for the job (Ray ends a GPU task's worker
    after each task, so a task would reload the models every chunk)."""

    def __init__(self, stages: list[Stage], cfg: Any) -> None:
        import torch

        torch.set_num_threads(1)
        self.fns = [(stage.name, stage.make(cfg, "cuda")) for stage in stages]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"payload": np.array([_run_chunk(p, self.fns) for p in batch["payload"]], dtype=object)}


def _put(chunks: Iterable[tuple[int, list]]) -> Iterator[tuple[int, int, Any]]:
    """Each chunk into Ray's object store as it is read (spilled to disk past the store's memory), so the
    driver holds references, not every input's bytes -> (index, items, reference)."""
    ray = _ray()
    for index, items in chunks:
        yield index, len(items), ray.put(pickle.dumps((index, items, {}), protocol=pickle.HIGHEST_PROTOCOL))


class _ChainActor:
    """Runs every stage on one item at a time: the isolation of a chunk whose worker died."""

    def __init__(self, stages: list[Stage], cfg: Any) -> None:
        import torch

        torch.set_num_threads(1)
        self.fns = [s.make(cfg, "cpu") for s in stages]

    def ready(self) -> bool:
        return True

    def run(self, k: int, index: int, item: Any) -> Any:
        """Stage ``k`` on one item: a death names the stage it happened in."""
        return self.fns[k](index, [item])[0]


def operator_groups(stages: list[Stage], gpus: bool) -> list[tuple[list[Stage], bool]]:
    """Consecutive stages that ask for the same resources run as one operator (Ray Data's own rule for fusing
    maps): on CPUs alone the whole chain is one task operator, whose workers build every model once and pass
    no decoded image between processes; with GPUs the model stages form their own GPU operator between the
    CPU ones. -> [(stages, on a GPU)]."""
    groups: list[tuple[list[Stage], bool]] = []
    for stage in stages:
        gpu = gpus and stage.model
        if groups and groups[-1][1] == gpu:
            groups[-1][0].append(stage)
        else:
            groups.append(([stage], gpu))
    return groups


def run_stages(chunks: Iterable[tuple[int, list]], stages: list[Stage], cfg: Any, *, workers: int,
               crashed: Callable[[Any, str, str], Any], progress: bool, unit: str) -> StageTimes:
    """Every ``(index, items)`` chunk through ``stages`` (the last one writes the chunk and returns what the
    driver counts: one entry per item)
    on the connected Ray instance (``connect``); ``crashed(item, stage, message)`` marks an item whose worker
    died on it in that stage. -> the stages' times."""
    import ray
    import ray.data

    rows = list(_put(chunks))  # the readers are sequential streams (tars, JSONL): they run here, once
    times = StageTimes()
    if not rows:
        return times
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.print_on_execution_start = False
    ctx.max_errored_blocks = -1  # a chunk whose worker died is redone sample by sample below, not fatal
    gpus = cluster_has_gpus()
    ds = ray.data.from_items([{"payload": ref} for _, _, ref in rows], override_num_blocks=len(rows))
    groups = operator_groups(stages, gpus)
    share = 1.0 / len(groups)  # the pipeline as a whole asks for `workers` CPUs
    with warnings.catch_warnings():
        # Retries are still set through the remote arguments Ray 2.6x calls deprecated (its own advice for
        # turning them off): a chunk that killed its worker would only kill the next one.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
        for group, gpu in groups:
            if gpu:
                ds = ds.map_batches(_GpuOperator, fn_constructor_args=(group, cfg), batch_size=1,
                                    batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers),
                                    num_cpus=share, num_gpus=1, max_task_retries=0, max_restarts=-1)
            else:
                ds = ds.map_batches(_cpu_operator, fn_args=(group, cfg), batch_size=1, batch_format="numpy",
                                    compute=ray.data.TaskPoolStrategy(size=workers), num_cpus=share, max_retries=0)
    done: set[int] = set()
    bar = tqdm(total=sum(n for _, n, _ in rows), desc=f"{unit}s", unit=unit, disable=not progress)
    try:
        for batch in ds.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=0):
            for payload in batch["payload"]:
                index, items, chunk_times = pickle.loads(payload)
                done.add(index)
                times.add(chunk_times)
                bar.update(len(items))
    except Exception as e:
        raise _setup_error(e) from None
    lost = [(index, ref) for index, _, ref in rows if index not in done]
    if lost:
        chain = ray.remote(max_restarts=-1, max_task_retries=0, num_cpus=1)(_ChainActor).remote(stages[:-1], cfg)
        write = stages[-1].make(cfg, "cpu")  # the chunk's writer runs here: the workers have done their part
        for index, ref in lost:
            _, items, _ = pickle.loads(ray.get(ref))
            write(index, _isolated(index, items, stages[:-1], chain, crashed))
            bar.update(len(items))
    bar.close()
    return times


def _isolated(index: int, items: list, stages: list[Stage], chain: Any, crashed: Callable[[Any, str, str], Any]
              ) -> list:
    """A chunk whose worker died, one item and one stage at a time through ``chain`` (a ``_ChainActor`` that
    Ray restarts when it dies): an item whose call dies again is ``crashed(item, stage, message)``; the others
    come out as the full chunk would have given them."""
    ray = _ray()
    dead = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.ActorUnavailableError)
    out = []
    for item in items:
        for k, stage in enumerate(stages):
            try:
                item = ray.get(chain.run.remote(k, index, item))
            except dead as e:
                item = crashed(item, stage.name, f"the worker processing it died ({type(e).__name__})")
                _wait_restarted(chain, dead)
                break
        out.append(item)
    return out


def _wait_restarted(chain: Any, dead: tuple, timeout: float = 300.0) -> None:
    """Until Ray has restarted the actor (a call sent before would fail as if its item had crashed it)."""
    ray = _ray()
    t0 = time.perf_counter()
    while True:
        try:
            ray.get(chain.ready.remote())
            return
        except dead:
            if time.perf_counter() - t0 > timeout:
                raise
            time.sleep(0.2)


def _setup_error(e: Exception) -> Exception:
    """The builder's own error when a Ray failure wraps one (a stage that cannot load its model): the
    original exception, without Ray's traceback text around it."""
    from data_curation.shard_jobs import StageSetupError

    seen: BaseException | None = e
    for _ in range(8):
        if seen is None:
            break
        inner = getattr(seen, "cause", None)  # a RayTaskError: the exception the task raised
        if inner is not None:
            seen = inner
            continue
        if isinstance(seen, StageSetupError):
            return seen
        seen = seen.__cause__
    return e
