"""Safety-classifier hooks (``safety.classifier: "tests.data_curation.stage_hooks:NAME"``) that misbehave on
one photo of ``test_shards``'s corpus, the Hubble deep field (1000 x 872): the stages run in Ray workers, so
a test cannot patch them in its own process; a hook is user code the workers import."""

import os
import signal

HUBBLE_SIZE = (1000, 872)


def raise_on_hubble(img) -> float:
    if img.size == HUBBLE_SIZE:
        raise MemoryError("simulated")
    return 0.0


def segfault_on_hubble(img) -> float:
    if img.size == HUBBLE_SIZE:
        os.kill(os.getpid(), signal.SIGSEGV)  # what a decoder with a memory bug does to its process
    return 0.0


def slow(img) -> float:
    """A classifier that takes its time: a job on it can be killed half-way."""
    import time

    time.sleep(0.3)
    return 0.0
