"""The Debian programs some tests run, and one way to ask for them.

`make test` installs these (the Makefile's ``system-deps`` target, as root) or names the command that does. A test
that needs one calls ``require_binary(name)``; when the program is missing the test FAILS with the install command
(never a skip, never a fixture traceback): a machine that only ran the README's commands must not go green by
skipping, nor red with an unexplained ``FileNotFoundError``. ``conftest.py`` reports a fixture that raised
``MissingSystemBinary`` as a failed test with that one line.
"""

from __future__ import annotations

import shutil

# program -> the Debian packages that provide it (the Makefile's SYSTEM_PACKAGES install all of them)
DEBIAN_PACKAGES = {
    "ffmpeg": "ffmpeg",
    "ffprobe": "ffmpeg",
    "tesseract": "tesseract-ocr tesseract-ocr-eng",
    "espeak-ng": "espeak-ng",
    "chromium": "chromium",
    "chromedriver": "chromium-driver",
}


class MissingSystemBinary(Exception):
    """A program a test runs is not on PATH; the message holds the install command."""


def require_binary(name: str) -> str:
    """The path of ``name`` on PATH, or ``MissingSystemBinary`` with the command that installs it."""
    path = shutil.which(name)
    if path is None:
        packages = DEBIAN_PACKAGES[name]
        raise MissingSystemBinary(f"{name} not found on PATH: apt-get install {packages} "
                                  "(`make test` installs it when run as root)")
    return path
