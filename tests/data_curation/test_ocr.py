"""OCR through the real tesseract binary on text rendered with PIL; failure modes through stand-in scripts."""

import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFont

from data_curation.ocr import (OCRError, OCRTimeoutError, OCRUnavailableError, TesseractOCR, parse_tsv,
                               text_regions)
from tests.system_deps import require_binary



def test_tesseract_is_installed():
    # `make test` installs it (Debian tesseract-ocr + tesseract-ocr-eng); the OCR tests below need it.
    require_binary("tesseract")

FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")


def font(size: int) -> ImageFont.FreeTypeFont:
    if FONT.exists():
        return ImageFont.truetype(str(FONT), size)
    return ImageFont.load_default(size=size)  # scalable since Pillow 10.1


def render(lines: list[str], size: int = 40, canvas: tuple[int, int] = (512, 512),
           at: tuple[int, int] = (20, 60)) -> Image.Image:
    img = Image.new("RGB", canvas, "white")
    draw = ImageDraw.Draw(img)
    for i, line in enumerate(lines):
        draw.text((at[0], at[1] + int(1.6 * size) * i), line, font=font(size), fill="black")
    return img


def found(expected: list[str], text: str) -> int:
    got = text.lower().split()
    return sum(w.lower() in got for w in expected)


@pytest.fixture(scope="module")
def ocr():
    return TesseractOCR()


def test_reads_one_line(ocr):
    result = ocr.read(render(["HELLO WORLD 2024"]))
    assert found(["HELLO", "WORLD", "2024"], result.text) >= 2, result.text
    assert "\n" not in result.text
    assert result.mean_conf >= 60 and result.n_words_rejected == 0
    hello = next(w for w in result.words if w["text"].lower() == "hello")
    x, y, w, h = hello["box"]
    assert 15 <= x <= 30 and 55 <= y <= 80 and 20 <= h <= 50  # where it was drawn, in input pixels


def test_two_line_sign_keeps_lines(ocr):
    result = ocr.read(render(["NO PARKING", "Tow away zone"]))
    assert found(["NO", "PARKING", "Tow", "away", "zone"], result.text) >= 4, result.text
    lines = result.text.splitlines()
    assert len(lines) == 2 and "parking" in lines[0].lower() and "zone" in lines[1].lower()


def test_small_image_is_upscaled_and_boxes_map_back(ocr):
    img = render(["SALE today only", "FRESH bread 2024"], size=10, canvas=(128, 40), at=(4, 4))  # a thumbnail
    result = ocr.read(img)  # 128x40 -> 4x
    assert found(["SALE", "today", "only", "FRESH", "bread", "2024"], result.text) >= 5, result.text
    for w in result.words:
        x, y, bw, bh = w["box"]
        assert 0 <= x and x + bw <= img.width + 1 and 0 <= y and y + bh <= img.height + 1 and bh <= 16


def test_transparent_background_reads_as_white(ocr):
    img = Image.new("RGBA", (512, 512), (0, 0, 0, 0))  # transparent black: flattened onto white
    ImageDraw.Draw(img).text((20, 60), "STOP HERE", font=font(48), fill=(0, 0, 0, 255))
    assert found(["STOP", "HERE"], ocr.read(img).text) == 2


def test_min_conf_above_100_rejects_every_word():
    result = TesseractOCR(min_conf=101).read(render(["HELLO WORLD 2024"]))
    assert result.text == "" and result.words == [] and result.mean_conf == 0.0
    assert result.n_words_rejected >= 2


def test_blank_image_has_no_text(ocr):
    result = ocr.read(Image.new("RGB", (512, 512), (230, 230, 230)))
    assert result.text == "" and result.words == []


def test_parse_tsv_skips_structure_rows_and_groups_lines():
    header = "level\tpage_num\tblock_num\tpar_num\tline_num\tword_num\tleft\ttop\twidth\theight\tconf\ttext"
    rows = ["1\t1\t0\t0\t0\t0\t0\t0\t100\t100\t-1\t",
            "5\t1\t1\t1\t1\t1\t10\t10\t20\t8\t95.5\tfoo",
            "5\t1\t1\t1\t1\t2\t40\t10\t20\t8\t30\tbar",
            "5\t1\t1\t1\t1\t3\t70\t10\t20\t8\t90\t\"baz\"",
            "5\t1\t1\t1\t2\t1\t10\t30\t20\t8\t91\t ",
            "5\t1\t2\t1\t1\t1\t10\t50\t21\t9\t80\tqux"]
    result = parse_tsv("\n".join([header, *rows]), min_conf=60, scale=2)
    assert result.text == 'foo "baz"\nqux'
    assert result.n_words_rejected == 1
    assert result.words[-1]["box"] == (5, 25, 11, 5)
    assert result.mean_conf == pytest.approx((95.5 + 90 + 80) / 3)


def test_missing_binary_is_named():
    with pytest.raises(OCRUnavailableError, match="apt-get install tesseract-ocr"):
        TesseractOCR(tesseract_cmd="/nonexistent/tesseract")


def test_missing_language_is_named():
    with pytest.raises(OCRUnavailableError, match=r"\['xxx'\].*tesseract-ocr-xxx"):
        TesseractOCR(lang="eng+xxx")


def fake_tesseract(tmp_path: Path, body: str) -> str:
    """A stand-in binary: answers the availability probe, then runs ``body`` for the OCR call."""
    path = tmp_path / "tesseract"
    path.write_text("#!/bin/sh\n"
                    'case "$1" in\n'
                    '  --version) echo "tesseract 5.3.0"; exit 0;;\n'
                    '  --list-langs) echo "List of available languages (1):"; echo eng; exit 0;;\n'
                    "esac\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


def test_timeout_is_named(tmp_path):
    ocr = TesseractOCR(tesseract_cmd=fake_tesseract(tmp_path, "exec sleep 10"), timeout=0.5)
    t0 = time.perf_counter()
    with pytest.raises(OCRTimeoutError, match="0.5 s timeout"):
        ocr.read(render(["x"]))
    assert time.perf_counter() - t0 < 5


def test_failure_carries_stderr(tmp_path):
    ocr = TesseractOCR(tesseract_cmd=fake_tesseract(tmp_path, 'echo "Error: leptonica exploded" >&2; exit 3'))
    with pytest.raises(OCRError, match="exited with 3: Error: leptonica exploded"):
        ocr.read(render(["x"]))


def test_the_text_detector_finds_every_rendered_text_and_skips_plain_photos():
    """The OCR stage reads only images where ``text_regions`` finds something: every image with words that
    these tests render (big, small, grey on grey, a thumbnail) must be found, so no OCR is lost to it; plain
    photos and a blank page are skipped."""
    import numpy as np
    from skimage import data as skdata

    with_text = [render(["HELLO WORLD 2024"]), render(["NO PARKING", "Tow away zone"]),
                 render(["SALE today only", "FRESH bread 2024"], size=10, canvas=(128, 40), at=(4, 4)),
                 render(["eight pixel words in a big image"], size=8),
                 render(["STOP HERE"], size=64, canvas=(560, 200), at=(30, 60)),
                 Image.fromarray(skdata.text()), Image.fromarray(skdata.page())]
    grey = Image.new("RGB", (512, 512), (200, 200, 200))
    ImageDraw.Draw(grey).text((20, 60), "QUIET ZONE", font=font(40), fill=(90, 90, 90))
    assert all(text_regions(img) > 0 for img in [*with_text, grey]), [text_regions(i) for i in with_text]
    plain = [Image.new("RGB", (512, 512), (230, 230, 230))] + [
        Image.fromarray(f()).convert("RGB") for f in (skdata.horse, skdata.brick, skdata.gravel, skdata.retina)]
    assert [text_regions(img) for img in plain] == [0] * len(plain)
    assert np.isfinite(text_regions(Image.new("L", (1, 1))))  # degenerate sizes do not raise
