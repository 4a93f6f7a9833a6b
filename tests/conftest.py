import os

import pytest
import torch

from tests.system_deps import MissingSystemBinary

# Tiny models are dominated by per-op overhead: on the 2-core CI machine one thread avoids
# oversubscription when other work shares the cores (the encoder tests: ~35 s with 2 threads vs ~7.5 s with 1).
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A missing system program is the test's failure, with the install command as its one line, whether the
    test or one of its fixtures asked for it (pytest would call a fixture's exception an 'error')."""
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is not None and call.excinfo.errisinstance(MissingSystemBinary):
        report.longrepr = f"{item.nodeid}: {call.excinfo.value}"
        report.missing_system_binary = True


def pytest_report_teststatus(report, config):
    if getattr(report, "missing_system_binary", False) and report.when == "setup":
        return "failed", "F", "FAILED"
    return None


@pytest.fixture
def road_threads():
    """The learning roads (tests/*/test_learning.py) run alone in the suite and are dominated by real matrix
    work, not per-op overhead: they take both cores (at most 2), as `bench_learning` does on the CI machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield
    torch.set_num_threads(before)
