"""OCR through the Tesseract command-line tool: the text in an image, word by word, with confidences.

The ``tesseract`` binary is run directly (no pytesseract): the image goes in as PNG on stdin and the
TSV report comes back on stdout, one row per layout element. Rows with ``conf == -1`` are structure
(page, block, paragraph, line); the others are words. Install with
``apt-get install tesseract-ocr tesseract-ocr-eng``.

Two choices that are ours, not Tesseract's:

- **Small images are upscaled.** Tesseract misreads text whose glyphs are only a few pixels tall
  (measured: 8 px DejaVuSans in a 512 px image reads 1 of 7 words at 1x, 7 of 7 at 2x). The text
  height is unknown before OCR, so the image size stands in for it: an image whose shorter side is
  under ``min_side`` is enlarged by the integer factor that brings it there (Lanczos, at most 4x).
  Word boxes are mapped back to the input's pixels.
- **One OpenMP thread per call** (``OMP_THREAD_LIMIT=1`` unless the caller's environment sets it):
  curation runs many images in parallel processes, and Tesseract's own threads then only oversubscribe
  the cores (Tesseract's docs advise the same for parallel runs).
"""

from __future__ import annotations

import io
import math
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from PIL import Image

INSTALL_HINT = "install it with `apt-get install tesseract-ocr tesseract-ocr-eng`"
MAX_UPSCALE = 4


class OCRError(RuntimeError):
    """Tesseract ran and failed (non-zero exit): the message carries its stderr."""


class OCRUnavailableError(OCRError):
    """The tesseract binary or its language data is missing."""


class OCRTimeoutError(OCRError):
    """Tesseract did not finish one image within the timeout."""


@dataclass
class OCRResult:
    text: str  # kept words joined by spaces, one text line per line
    words: list[dict[str, Any]] = field(default_factory=list)  # kept: {"text", "conf", "box": (x, y, w, h)}
    mean_conf: float = 0.0  # mean confidence of the kept words, 0.0 if none
    n_words_rejected: int = 0  # words under min_conf


@lru_cache(maxsize=None)
def _probe(cmd: str, timeout: float) -> tuple[str, frozenset[str]]:
    """(version line, installed languages) of a tesseract binary; cached per binary."""
    def call(*args: str) -> subprocess.CompletedProcess:
        try:
            return subprocess.run([cmd, *args], capture_output=True, text=True, timeout=timeout, check=True)
        except (OSError, subprocess.SubprocessError) as e:
            raise OCRUnavailableError(f"`{cmd} {' '.join(args)}` failed ({e}); {INSTALL_HINT}") from e

    version = call("--version")
    langs = call("--list-langs")
    # Tesseract 5 prints both to stdout, 4.x to stderr; the language list follows a header line.
    version_line = ((version.stdout + version.stderr).strip().splitlines() or ["tesseract (no version)"])[0]
    lines = (langs.stdout + langs.stderr).strip().splitlines()
    return version_line, frozenset(line.strip() for line in lines[1:] if line.strip())


class TesseractOCR:
    """Reads the text in PIL images with the tesseract CLI.

    ``lang`` is a Tesseract language code (``"eng"``, or ``"eng+deu"``); ``psm`` the page segmentation
    mode (3: automatic layout, 6: one block, 7: one line, 11: sparse text); ``min_conf`` the word
    confidence (0-100) under which a word is rejected; ``timeout`` seconds per image; ``min_side``
    the shorter side below which images are upscaled (0: never).
    """

    def __init__(self, lang: str = "eng", min_conf: float = 60.0, psm: int = 3, timeout: float = 30.0,
                 tesseract_cmd: str = "tesseract", min_side: int = 512):
        self.lang, self.min_conf, self.psm = lang, min_conf, psm
        self.timeout, self.min_side = timeout, min_side
        cmd = shutil.which(tesseract_cmd)
        if cmd is None:
            raise OCRUnavailableError(f"tesseract binary {tesseract_cmd!r} not found; {INSTALL_HINT}")
        self.cmd = cmd
        self.version, installed = _probe(cmd, timeout)
        missing = [code for code in lang.split("+") if code not in installed]
        if missing:
            packages = " ".join("tesseract-ocr-" + code.lower().replace("_", "-") for code in missing)
            raise OCRUnavailableError(f"tesseract language data {missing} not installed (have "
                                      f"{sorted(installed)}); install it with `apt-get install {packages}`")

    def read(self, img: Image.Image) -> OCRResult:
        """OCR one image. Raises OCRTimeoutError past the timeout, OCRError if tesseract fails."""
        gray, scale = self._prepare(img)
        buf = io.BytesIO()
        gray.save(buf, format="PNG", compress_level=1)  # fast: the bytes only travel through a pipe
        env = dict(os.environ)
        env.setdefault("OMP_THREAD_LIMIT", "1")
        args = [self.cmd, "-", "stdout", "--psm", str(self.psm), "-l", self.lang, "tsv"]
        try:
            proc = subprocess.run(args, input=buf.getvalue(), capture_output=True, timeout=self.timeout,
                                  env=env)
        except subprocess.TimeoutExpired as e:
            raise OCRTimeoutError(f"tesseract took longer than the {self.timeout:g} s timeout on a "
                                  f"{img.width}x{img.height} image") from e
        if proc.returncode != 0:
            stderr = proc.stderr.decode(errors="replace").strip()
            raise OCRError(f"tesseract exited with {proc.returncode}: {stderr}")
        return parse_tsv(proc.stdout.decode("utf-8", errors="replace"), self.min_conf, scale)

    def _prepare(self, img: Image.Image) -> tuple[Image.Image, int]:
        """Grayscale (transparency flattened onto white) and upscaled when small."""
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(flat, rgba)
        gray = img.convert("L")
        short = min(gray.size)
        scale = 1
        if 0 < short < self.min_side:
            scale = min(MAX_UPSCALE, math.ceil(self.min_side / short))
            gray = gray.resize((gray.width * scale, gray.height * scale), Image.LANCZOS)
        return gray, scale


def text_regions(img: Image.Image, max_side: int = 640, min_short_side: int = 256) -> int:
    """How many word-like regions a cheap detector finds (a few milliseconds, against a Tesseract run of a
    tenth of a second or more): the morphological gradient of the grey image, Otsu's threshold, letters
    joined along a line by a 15 x 3 closing, then boxes at least 6 px tall, under 30% of the image's height,
    at least 1.5x as wide as tall and 15-95% edge pixels (big letters have few: only their outlines). The
    image is first brought to at most ``max_side`` on its long side and at least ``min_short_side`` on its
    short one. The curation OCR stage runs Tesseract only where this finds one (``ocr.detect_text``): it
    finds every rendered text of the OCR tests, from 8 px words to 64 px signs, and skips 5 of 14 of
    scikit-image's photos without text (fur, galaxies, coins and hands look like words to it): it is tuned to
    miss no text rather than to skip many photos."""
    import cv2
    import numpy as np

    gray = np.asarray(img.convert("L"))
    h, w = gray.shape
    s = min(max_side / max(h, w), max(1.0, min_short_side / min(h, w)))
    if s != 1:
        gray = cv2.resize(gray, (max(1, round(w * s)), max(1, round(h * s))),
                          interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    grad = cv2.morphologyEx(gray, cv2.MORPH_GRADIENT, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3)))
    _, edges = cv2.threshold(grad, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    lines = cv2.morphologyEx(edges, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_RECT, (15, 3)))
    contours, _ = cv2.findContours(lines, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    found = 0
    for c in contours:
        x, y, bw, bh = cv2.boundingRect(c)
        if 6 <= bh <= 0.3 * gray.shape[0] and bw >= 1.5 * bh:
            found += 0.15 < cv2.countNonZero(edges[y:y + bh, x:x + bw]) / (bw * bh) < 0.95
    return found


def parse_tsv(tsv: str, min_conf: float, scale: int = 1) -> OCRResult:
    """Words and text lines from Tesseract's TSV report; boxes divided by ``scale``."""
    lines: dict[tuple[int, int, int, int], list[str]] = {}  # (page, block, par, line) -> kept words, in order
    words, rejected = [], 0
    for row in tsv.splitlines()[1:]:  # first row is the header
        cols = row.split("\t", 11)
        if len(cols) < 12:
            continue
        conf, text = float(cols[10]), cols[11].strip()
        if conf < 0 or not text:  # structure rows; empty "words" Tesseract sometimes reports
            continue
        if conf < min_conf:
            rejected += 1
            continue
        left, top, width, height = (int(v) for v in cols[6:10])
        box = (left // scale, top // scale, math.ceil(width / scale), math.ceil(height / scale))
        words.append({"text": text, "conf": conf, "box": box})
        lines.setdefault(tuple(int(v) for v in cols[1:5]), []).append(text)
    text = "\n".join(" ".join(line) for line in lines.values())
    mean_conf = sum(w["conf"] for w in words) / len(words) if words else 0.0
    return OCRResult(text=text, words=words, mean_conf=mean_conf, n_words_rejected=rejected)
