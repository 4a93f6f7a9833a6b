"""Spoken digit strings rendered by espeak-ng ("three one four"): the speech task's raw audio.

    utts = synthesize_digits(8, seed=0)                  # list[SpokenDigits], 16 kHz float32 samples
    utts = synthesize_digits(8, seed=0, out_dir="wavs")  # and keeps espeak-ng's wavs as wavs/00000.wav ...

Each utterance is 3-5 uniform random digits, rendered by its own ``espeak-ng`` process with a voice, speed
(words per minute) and pitch drawn per utterance, read back through `media.audio.load_audio` (22.05 kHz ->
16 kHz). Another seed gives unseen digit strings and speed/pitch draws, from the same voices.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from media.audio import SAMPLE_RATE, load_audio

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# espeak-ng's own (non-MBROLA) English voices, two with its female/male variants; `espeak-ng --voices=en`.
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en-us+f2", "en-gb+f4")
SPEED_WPM = (130, 200)  # espeak-ng -s (default 175)
PITCH = (25, 75)  # espeak-ng -p, 0-99 (default 50)


class EspeakError(RuntimeError):
    """espeak-ng is missing or failed; the message says which and how to install it."""


@dataclass
class SpokenDigits:
    text: str  # "three one four"
    samples: np.ndarray  # (T,) float32 at 16 kHz
    voice: str
    speed: int
    pitch: int

    @property
    def duration_s(self) -> float:
        return len(self.samples) / SAMPLE_RATE


def espeak_binary() -> str:
    path = shutil.which("espeak-ng")
    if path is None:
        raise EspeakError("espeak-ng not found on PATH: the spoken-digit set is rendered with it "
                          "(Debian/Ubuntu: apt-get install espeak-ng)")
    return path


def random_digit_string(rng: random.Random) -> str:
    return " ".join(rng.choice(DIGITS) for _ in range(rng.randint(3, 5)))


def _render(binary: str, text: str, voice: str, speed: int, pitch: int, path: Path) -> np.ndarray:
    cmd = [binary, "-w", str(path), "-v", voice, "-s", str(speed), "-p", str(pitch), text]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not path.is_file():
        raise EspeakError(f"{' '.join(cmd)!r} failed (exit {done.returncode}): {done.stderr.strip()}")
    return load_audio(path).samples


def synthesize_digits(n: int, seed: int, out_dir: str | Path | None = None, workers: int = 4) -> list[SpokenDigits]:
    """``n`` utterances of 3-5 random digit words, each rendered by espeak-ng (``workers`` at a time).

    The wavs (espeak-ng's 22.05 kHz) go to ``out_dir`` as ``00000.wav``... when given, else to a
    temporary directory removed afterwards. Deterministic in ``seed``. Raises `EspeakError`.
    """
    binary = espeak_binary()
    rng = random.Random(seed)
    specs = [(random_digit_string(rng), rng.choice(VOICES), rng.randint(*SPEED_WPM), rng.randint(*PITCH))
             for _ in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(out_dir) if out_dir is not None else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max(1, workers)) as pool:  # threads only wait on the subprocesses
            samples = list(pool.map(lambda i: _render(binary, *specs[i], out / f"{i:05d}.wav"), range(n)))
    return [SpokenDigits(text, x, voice, speed, pitch) for (text, voice, speed, pitch), x in zip(specs, samples)]
