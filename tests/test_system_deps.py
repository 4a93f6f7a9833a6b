"""The programs the tests run are the ones `make test` installs, and a missing one fails its test with the
install command (checked by running two real tests with a PATH that lacks them)."""

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.system_deps import DEBIAN_PACKAGES

ROOT = Path(__file__).resolve().parents[1]


def _make_var(name: str) -> set[str]:
    text = (ROOT / "Makefile").read_text()
    match = re.search(rf"^{name} := (.+)$", text, re.M)
    assert match, f"Makefile has no {name}"
    return set(match.group(1).split())


def test_makefile_installs_every_program_the_tests_need():
    assert _make_var("SYSTEM_PROGRAMS") == set(DEBIAN_PACKAGES)
    needed = {pkg for pkgs in DEBIAN_PACKAGES.values() for pkg in pkgs.split()}
    assert _make_var("SYSTEM_PACKAGES") == needed


def test_missing_program_fails_the_test_with_the_install_command(tmp_path):
    # Only the interpreter's folder on PATH: espeak-ng and ffmpeg (in /usr/bin) are then missing. One test asks in
    # a fixture (espeak-ng), one in its body (ffmpeg).
    tests = ["tests/speech/test_features.py::test_logmel_matches_librosa_on_speech",
             "tests/scripts/test_bench_video.py::test_bench_video_json_small"]
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert re.search(r"^2 failed in ", out, re.M), out  # failures, not fixture errors, not skips
    assert "espeak-ng not found on PATH: apt-get install espeak-ng" in out
    assert "ffmpeg not found on PATH: apt-get install ffmpeg" in out
    assert "error" not in out.splitlines()[-1]
