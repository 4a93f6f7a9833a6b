"""Safety stage: a perceptual-hash blocklist, an optional unsafe-content classifier, face blurring.

``SafetyFilter.apply`` runs them cheapest first: the pHash lookup (about a millisecond), then the
classifier, then face detection and blurring on the images that are kept.

- Faces are found with OpenCV's bundled Haar cascade (``haarcascade_frontalface_default.xml``).
  opencv-python 5.x no longer ships the cascades, hence the ``<5`` pin; a missing file raises
  ``SafetyModelError``. Each face is blurred the way img2dataset's blurrer (after the ImageNet face
  obfuscation work) does it: the box enlarged by 0.1 of its diagonal per side, a Gaussian with
  sigma proportional to the box diagonal, a feathered blend, but per box, and confined to the
  enlarged box so every pixel outside it is left as it was.
- The blocklist holds 64-bit ``imagehash.phash`` values; a lookup is one vectorised XOR + popcount
  over the whole list (a million entries: about 2 ms with numpy 2's ``bitwise_count``).
- The classifier is any ``Callable[[PIL.Image], float]`` named by a ``"module.sub:function"`` string
  (e.g. an NSFW model wrapped by the user); none is bundled.
"""

from __future__ import annotations

import importlib
import math
import re
from pathlib import Path
from typing import Callable

import cv2
import imagehash
import numpy as np
from PIL import Image

Box = tuple[int, int, int, int]  # (x, y, w, h) in input pixels
CASCADE = "haarcascade_frontalface_default.xml"
_HEX64 = re.compile(r"[0-9a-fA-F]{16}")
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


class SafetyModelError(RuntimeError):
    """A detector or classifier cannot be loaded (missing cascade file, bad import spec)."""


class BlocklistError(ValueError):
    """A malformed pHash in a blocklist."""


# ---------------------------------------------------------------------------------------------------
# Face blurring


class FaceBlurrer:
    """Detects frontal faces (Haar cascade) and Gaussian-blurs them.

    Detection runs on a grayscale copy whose longer side is at most ``detect_max_side`` (faces
    smaller than ``min_size`` in input pixels are not searched for). ``blur_strength`` is the
    Gaussian sigma as a fraction of the enlarged box's diagonal (img2dataset: 0.1); ``expand`` the
    margin added to each side of a detection, as a fraction of its diagonal.
    """

    def __init__(self, scale_factor: float = 1.1, min_neighbors: int = 5,
                 min_size: tuple[int, int] = (24, 24), blur_strength: float = 0.1, expand: float = 0.1,
                 detect_max_side: int = 1024):
        self.scale_factor, self.min_neighbors, self.min_size = scale_factor, min_neighbors, tuple(min_size)
        self.blur_strength, self.expand, self.detect_max_side = blur_strength, expand, detect_max_side
        self.cascade = _load_cascade()

    def __getstate__(self) -> dict:  # picklable for worker processes: the cascade is reloaded there
        return {k: v for k, v in self.__dict__.items() if k != "cascade"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.cascade = _load_cascade()

    def detect(self, img: Image.Image) -> list[Box]:
        """Face boxes (x, y, w, h) in the input's pixels, as detected (not enlarged)."""
        gray = np.asarray(img.convert("L"))
        h, w = gray.shape
        scale = min(1.0, self.detect_max_side / max(h, w))
        if scale < 1.0:
            gray = cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))),
                              interpolation=cv2.INTER_AREA)
        min_size = tuple(max(1, math.ceil(s * scale)) for s in self.min_size)
        found = self.cascade.detectMultiScale(gray, scaleFactor=self.scale_factor,
                                              minNeighbors=self.min_neighbors, minSize=min_size)
        boxes = []
        for x, y, bw, bh in found:
            x0, y0 = int(x / scale), int(y / scale)
            x1, y1 = min(w, math.ceil((x + bw) / scale)), min(h, math.ceil((y + bh) / scale))
            boxes.append((x0, y0, x1 - x0, y1 - y0))
        return sorted(boxes)

    def blur(self, img: Image.Image) -> tuple[Image.Image, list[Box]]:
        """(image with every detected face blurred, the blurred regions as (x, y, w, h)).

        With no face the input object itself is returned. Pixels outside the returned boxes are
        unchanged; ``P``/``CMYK``/... inputs come back as RGB.
        """
        faces = self.detect(img)
        if not faces:
            return img, []
        if img.mode not in ("RGB", "RGBA", "L", "LA"):
            img = img.convert("RGB")
        arr = np.array(img)
        regions = [self._blur_box(arr, box) for box in faces]
        return Image.fromarray(arr), regions

    def _blur_box(self, arr: np.ndarray, box: Box) -> Box:
        """Blur one face in place; returns the enlarged region it touched."""
        H, W = arr.shape[:2]
        x, y, w, h = box
        margin = max(1, round(self.expand * math.hypot(w, h)))
        ex0, ey0, ex1, ey1 = x - margin, y - margin, x + w + margin, y + h + margin  # may leave the image
        x0, y0, x1, y1 = max(0, ex0), max(0, ey0), min(W, ex1), min(H, ey1)
        sigma = max(1.0, self.blur_strength * math.hypot(ex1 - ex0, ey1 - ey0))
        # Blur a crop with context around the region, so the blur sees real pixels, not padding.
        pad = math.ceil(3 * sigma)
        cx0, cy0, cx1, cy1 = max(0, x0 - pad), max(0, y0 - pad), min(W, x1 + pad), min(H, y1 + pad)
        crop = arr[cy0:cy1, cx0:cx1].astype(np.float32)
        blurred = _gaussian(crop, sigma)[y0 - cy0:y1 - cy0, x0 - cx0:x1 - cx0]
        # Feathered mask: 1 over the detection, ramping to 0 across the margin (measured from the
        # unclipped enlarged box, so a face cut by the image border is fully blurred up to it).
        mask = np.outer(_ramp(y0, y1, ey0, ey1, margin), _ramp(x0, x1, ex0, ex1, margin)).astype(np.float32)
        if arr.ndim == 3:
            mask = mask[..., None]
        region = arr[y0:y1, x0:x1].astype(np.float32)
        arr[y0:y1, x0:x1] = np.clip(region * (1 - mask) + blurred * mask + 0.5, 0, 255).astype(arr.dtype)
        return (x0, y0, x1 - x0, y1 - y0)


def _load_cascade() -> cv2.CascadeClassifier:
    path = Path(getattr(getattr(cv2, "data", None), "haarcascades", "")) / CASCADE
    if not path.is_file():
        raise SafetyModelError(f"OpenCV face cascade {path} not found (cv2 {cv2.__version__}); "
                               "opencv-python 5.x dropped the bundled cascades: "
                               "pip install 'opencv-python-headless<5'")
    cascade = cv2.CascadeClassifier(str(path))
    if cascade.empty():
        raise SafetyModelError(f"OpenCV could not load the face cascade {path}")
    return cascade


def _ramp(lo: int, hi: int, edge_lo: int, edge_hi: int, margin: int) -> np.ndarray:
    """Weights for pixels lo..hi-1: 0 at the edges edge_lo / edge_hi - 1, 1 from ``margin`` inside."""
    i = np.arange(lo, hi)
    return np.clip(np.minimum(i - edge_lo, edge_hi - 1 - i) / margin, 0, 1)


def _gaussian(crop: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur; large sigmas run on a downsampled copy (same look, kernel cost bounded)."""
    factor = int(sigma // 8)
    if factor < 2:
        return cv2.GaussianBlur(crop, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)
    h, w = crop.shape[:2]
    small = cv2.resize(crop, (max(1, w // factor), max(1, h // factor)), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), sigma / factor, borderType=cv2.BORDER_REPLICATE)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


# ---------------------------------------------------------------------------------------------------
# Perceptual-hash blocklist


def phash_hex(img: Image.Image) -> str:
    """The 64-bit ``imagehash.phash`` as 16 hex digits (imagehash's own string form)."""
    return str(imagehash.phash(img))


def _popcount_table(x: np.ndarray) -> np.ndarray:
    """Set bits per uint64, (N,) -> (N,) uint8, by a byte lookup table (numpy < 2)."""
    return _POPCOUNT[np.ascontiguousarray(x).view(np.uint8)].reshape(-1, 8).sum(axis=1, dtype=np.uint8)


_popcount64 = getattr(np, "bitwise_count", _popcount_table)  # numpy >= 2: ~25x faster (1M entries: 2 ms)


def _parse_hash(text: str) -> int:
    """One 16-hex-digit pHash as an int; ValueError otherwise."""
    if not _HEX64.fullmatch(text):
        raise ValueError("expected 16 hex digits (a 64-bit imagehash.phash)")
    return int(text, 16)


class PHashBlocklist:
    """Known-bad images by 64-bit pHash; an image matches at Hamming distance <= ``max_distance``."""

    def __init__(self, hashes: np.ndarray | None = None, max_distance: int = 8):
        self._hashes = np.zeros(0, dtype=np.uint64) if hashes is None else np.asarray(hashes, dtype=np.uint64)
        self._added: list[int] = []  # from add(), folded into the array on the next read
        self.max_distance = max_distance

    @property
    def hashes(self) -> np.ndarray:
        """(N,) uint64, one pHash per entry."""
        if self._added:
            self._hashes = np.concatenate([self._hashes, np.array(self._added, dtype=np.uint64)])
            self._added = []
        return self._hashes

    @classmethod
    def from_hashes(cls, hashes: list[str], max_distance: int = 8) -> "PHashBlocklist":
        values = []
        for i, text in enumerate(hashes):
            try:
                values.append(_parse_hash(text.strip()))
            except ValueError as e:
                raise BlocklistError(f"hash #{i} {text!r} is malformed: {e}") from None
        return cls(np.array(values, dtype=np.uint64), max_distance)

    @classmethod
    def load(cls, path: str | Path, max_distance: int = 8) -> "PHashBlocklist":
        """A text file of one hex pHash per line; ``#`` starts a comment, blank lines are skipped."""
        values = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                text = line.split("#", 1)[0].strip()
                if not text:
                    continue
                try:
                    values.append(_parse_hash(text))
                except ValueError as e:
                    raise BlocklistError(f"{path}:{lineno}: malformed pHash {text!r}: {e}") from None
        return cls(np.array(values, dtype=np.uint64), max_distance)

    def save(self, path: str | Path) -> None:
        lines = ["# 64-bit imagehash.phash, one per line (hex)"] + [f"{int(v):016x}" for v in self.hashes]
        Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")

    def __len__(self) -> int:
        return len(self._hashes) + len(self._added)

    def add(self, img: Image.Image) -> str:
        """Block an image; returns its pHash."""
        text = phash_hex(img)
        self._added.append(int(text, 16))
        return text

    def distances(self, hash_hex: str) -> np.ndarray:
        """Hamming distance from one pHash to every entry, (N,) uint8."""
        return _popcount64(self.hashes ^ np.uint64(_parse_hash(hash_hex)))

    def match_hash(self, hash_hex: str) -> tuple[bool, int | None]:
        """(matched?, distance to the closest entry; None for an empty list)."""
        if not len(self.hashes):
            return False, None
        d = int(self.distances(hash_hex).min())
        return d <= self.max_distance, d

    def match(self, img: Image.Image) -> tuple[bool, int | None]:
        return self.match_hash(phash_hex(img))


# ---------------------------------------------------------------------------------------------------
# Classifier hook and the stage


def load_classifier(spec: str | None) -> Callable[[Image.Image], float] | None:
    """``None`` -> no classifier; ``"module.sub:function"`` -> that callable (image -> unsafe score)."""
    if spec is None:
        return None
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise SafetyModelError(f"classifier spec {spec!r} is not of the form 'module.sub:function'")
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise SafetyModelError(f"cannot load classifier {spec!r}: {e}") from e
    if not callable(obj):
        raise SafetyModelError(f"classifier {spec!r} is a {type(obj).__name__}, not a callable")
    return obj


class SafetyFilter:
    """Drops blocklisted and unsafe images, blurs faces in the rest.

    ``apply`` returns (image or None if dropped, drop reason or None, fields). Fields always carry
    the same keys so they stack into a table: ``phash``, ``phash_distance`` (closest blocklist
    entry), ``unsafe_score``, ``faces_blurred``; None where that step did not run.
    """

    def __init__(self, blocklist: PHashBlocklist | None, classifier: Callable[[Image.Image], float] | None,
                 classifier_threshold: float = 0.5, blur_faces: bool = True,
                 blurrer: FaceBlurrer | None = None):
        self.blocklist, self.classifier = blocklist, classifier
        self.classifier_threshold = classifier_threshold
        self.blurrer = (blurrer or FaceBlurrer()) if blur_faces else None

    def apply(self, img: Image.Image) -> tuple[Image.Image | None, str | None, dict]:
        fields = {"phash": phash_hex(img), "phash_distance": None, "unsafe_score": None,
                  "faces_blurred": None}
        if self.blocklist is not None:
            matched, d = self.blocklist.match_hash(fields["phash"])
            fields["phash_distance"] = d
            if matched:
                return None, f"phash_blocklist(d={d})", fields
        if self.classifier is not None:
            score = float(self.classifier(img))
            if not math.isfinite(score):
                raise SafetyModelError(f"classifier {self.classifier!r} returned {score}")
            fields["unsafe_score"] = score
            if score > self.classifier_threshold:
                return None, f"unsafe({score:.2f}>{self.classifier_threshold:g})", fields
        if self.blurrer is not None:
            img, regions = self.blurrer.blur(img)
            fields["faces_blurred"] = len(regions)
        return img, None, fields
