"""Safety stage on real photos (scikit-image's bundled astronaut, coffee, camera): faces, pHash, hook."""

import io
import pickle

import numpy as np
import pytest
from PIL import Image, ImageDraw

from data_curation import safety
from data_curation.safety import (BlocklistError, FaceBlurrer, PHashBlocklist, SafetyFilter, SafetyModelError,
                                  load_classifier, phash_hex)

from skimage import data as skdata  # noqa: E402  (a dev dependency)

# Hand-labelled face of the astronaut (Eileen Collins) in the 512x512 image: hairline to chin.
FACE = (180, 60, 272, 175)  # x0, y0, x1, y1


def fake_classifier(img: Image.Image) -> float:
    """Referenced as tests.data_curation.test_safety:fake_classifier: 'unsafe' = mostly red."""
    r, g, b = np.asarray(img.convert("RGB"), dtype=np.float32).mean(axis=(0, 1))
    return float(r / (r + g + b + 1e-6))


NOT_CALLABLE = 42


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return Image.fromarray(skdata.astronaut())


@pytest.fixture(scope="module")
def coffee() -> Image.Image:
    return Image.fromarray(skdata.coffee())


@pytest.fixture(scope="module")
def blurrer() -> FaceBlurrer:
    return FaceBlurrer()


def iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def xyxy(box):
    x, y, w, h = box
    return (x, y, x + w, y + h)


def sharpness(arr: np.ndarray) -> float:
    return float(np.abs(np.diff(arr.astype(np.float32), axis=1)).mean())


# ---------------------------------------------------------------------------------------------------
# Faces


def test_finds_the_astronauts_face(blurrer, astronaut):
    boxes = blurrer.detect(astronaut)
    assert len(boxes) == 1
    assert iou(xyxy(boxes[0]), FACE) > 0.5, boxes


def test_detection_on_a_downscaled_copy_maps_boxes_back(astronaut):
    big = astronaut.resize((1536, 1536), Image.LANCZOS)
    boxes = FaceBlurrer(detect_max_side=512).detect(big)  # detection runs at 512, boxes come back at 1536
    face3 = tuple(3 * v for v in FACE)
    assert any(iou(xyxy(b), face3) > 0.5 for b in boxes), boxes


def test_blur_hides_the_face_and_leaves_everything_else(blurrer, astronaut):
    out, regions = blurrer.blur(astronaut)
    assert out.size == astronaut.size and out.mode == astronaut.mode and len(regions) == 1
    before, after = np.asarray(astronaut), np.asarray(out)
    x, y, w, h = regions[0]
    inside = np.zeros(before.shape[:2], dtype=bool)
    inside[y:y + h, x:x + w] = True
    assert np.array_equal(before[~inside], after[~inside])  # outside the blurred region: bit-identical
    # The face itself: fine detail gone, pixels far from where they were.
    x0, y0, x1, y1 = FACE
    crop = (slice(y0 + 20, y1 - 20), slice(x0 + 15, x1 - 15))
    assert sharpness(after[crop]) < 0.25 * sharpness(before[crop])
    assert np.abs(after[crop].astype(int) - before[crop].astype(int)).mean() > 8
    assert blurrer.detect(out) == []  # no longer a face to the detector


def test_no_face_returns_the_input_unchanged(blurrer, coffee):
    drawing = Image.new("RGB", (320, 240), "white")
    ImageDraw.Draw(drawing).rectangle((40, 40, 200, 160), fill=(30, 120, 200))
    for img in (coffee, drawing, Image.fromarray(skdata.camera())):
        out, regions = blurrer.blur(img)
        assert regions == [] and out is img


def test_grayscale_and_rgba_keep_their_mode(blurrer, astronaut):
    for mode in ("L", "RGBA"):
        out, regions = blurrer.blur(astronaut.convert(mode))
        assert out.mode == mode and len(regions) == 1


def test_large_faces_blur_on_the_downsampled_path(astronaut):
    big = astronaut.resize((2048, 2048), Image.BILINEAR)
    out, regions = FaceBlurrer().blur(big)
    assert len(regions) >= 1 and max(w for _, _, w, _ in regions) > 400  # sigma > 50: blurred at 1/6 size
    x0, y0, x1, y1 = (4 * v for v in FACE)
    crop = (slice(y0 + 80, y1 - 80), slice(x0 + 60, x1 - 60))
    assert sharpness(np.asarray(out)[crop]) < 0.25 * sharpness(np.asarray(big)[crop])


def test_face_cut_by_the_border_is_blurred_up_to_it(blurrer, monkeypatch):
    noise = np.random.default_rng(0).integers(0, 256, size=(100, 100, 3), dtype=np.uint8)
    monkeypatch.setattr(blurrer, "detect", lambda img: [(0, 30, 40, 40)])  # touches the left border
    out, regions = blurrer.blur(Image.fromarray(noise))
    assert regions == [(0, 24, 46, 52)]  # enlarged by round(0.1 * diag) = 6 px, clipped at x = 0
    after = np.asarray(out).astype(np.float32)
    face = (slice(30, 70), slice(0, 40))
    assert sharpness(after[face]) < 0.2 * sharpness(noise[face])
    assert np.abs(after[30:70, 0] - noise[30:70, 0]).mean() > 30  # the border column too


def test_blurrer_pickles_for_worker_processes(blurrer, astronaut):
    clone = pickle.loads(pickle.dumps(blurrer))
    assert clone.detect(astronaut) == blurrer.detect(astronaut)


def test_missing_cascade_is_named(monkeypatch):
    class NoCascades:
        haarcascades = "/nonexistent/opencv5/"

    monkeypatch.setattr(safety.cv2, "data", NoCascades, raising=False)
    with pytest.raises(SafetyModelError, match="frontalface_default.xml.*opencv-python-headless<5"):
        FaceBlurrer()


# ---------------------------------------------------------------------------------------------------
# pHash blocklist


def jpeg_copy(img: Image.Image, size: tuple[int, int], quality: int = 40) -> Image.Image:
    buf = io.BytesIO()
    img.resize(size, Image.BILINEAR).save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue()))


def test_resized_recompressed_copy_matches_and_unrelated_photo_does_not(astronaut, coffee):
    blocklist = PHashBlocklist.from_hashes([phash_hex(astronaut)])
    matched, d = blocklist.match(jpeg_copy(astronaut, (300, 300)))
    assert matched and d <= 4
    for other in (coffee, Image.fromarray(skdata.camera()), Image.fromarray(skdata.chelsea())):
        matched, d = blocklist.match(other)
        assert not matched and d > 16


def test_closest_entry_wins_in_a_large_list(astronaut):
    rng = np.random.default_rng(0)
    hashes = [f"{v:016x}" for v in rng.integers(0, 2**64, size=50_000, dtype=np.uint64)]
    blocklist = PHashBlocklist.from_hashes(hashes, max_distance=6)
    target = int(phash_hex(astronaut), 16)
    blocklist.hashes[1234] = np.uint64(target ^ 0b10101)  # 3 bits off
    assert blocklist.match(astronaut) == (True, 3)
    assert PHashBlocklist().match(astronaut) == (False, None)


def test_popcount_paths_agree():
    x = np.random.default_rng(1).integers(0, 2**64, size=1000, dtype=np.uint64)
    expected = np.array([bin(int(v)).count("1") for v in x])
    assert np.array_equal(safety._popcount_table(x), expected)
    assert np.array_equal(safety._popcount64(x), expected)


def test_add_save_load_round_trip(tmp_path, astronaut, coffee):
    blocklist = PHashBlocklist(max_distance=5)
    added = blocklist.add(astronaut)
    assert added == phash_hex(astronaut) and len(blocklist) == 1
    blocklist.add(coffee)
    assert blocklist.match(coffee) == (True, 0)
    path = tmp_path / "blocklist.txt"
    blocklist.save(path)
    extra = "FFFFFFFFFFFFFFFF  # upper case, trailing comment\n"
    path.write_text("# a comment line\n\n" + path.read_text() + extra)
    loaded = PHashBlocklist.load(path, max_distance=5)
    assert len(loaded) == 3 and loaded.max_distance == 5
    assert np.array_equal(loaded.hashes[:2], blocklist.hashes)
    assert loaded.match(coffee) == (True, 0)


@pytest.mark.parametrize("bad", ["c2924c5532bddfc", "c2924c5532bddfc8a", "g2924c5532bddfc8",
                                 "+2924c5532bddfc8", "c2924c55_2bddfc8"])
def test_malformed_file_names_file_and_line(tmp_path, bad):
    path = tmp_path / "bl.txt"
    path.write_text(f"# header\nc2924c5532bddfc8\n{bad}\n")
    with pytest.raises(BlocklistError, match=rf"bl.txt:3: malformed pHash '{bad.replace('+', '[+]')}'"):
        PHashBlocklist.load(path)
    with pytest.raises(BlocklistError, match="hash #1"):
        PHashBlocklist.from_hashes(["c2924c5532bddfc8", bad])


# ---------------------------------------------------------------------------------------------------
# Classifier hook and the stage


def test_load_classifier():
    assert load_classifier(None) is None
    fn = load_classifier("tests.data_curation.test_safety:fake_classifier")
    assert fn(Image.new("RGB", (8, 8), (255, 0, 0))) > 0.99
    for spec, msg in [("tests.data_curation.test_safety", "not of the form"),
                      ("tests.data_curation.nope:fn", "cannot load classifier 'tests.data_curation.nope:fn'"),
                      ("tests.data_curation.test_safety:nope", "cannot load classifier"),
                      ("tests.data_curation.test_safety:NOT_CALLABLE", "is a int, not a callable")]:
        with pytest.raises(SafetyModelError, match=msg):
            load_classifier(spec)


def test_filter_drops_blocklisted_images_before_anything_else(astronaut):
    calls = []
    blocklist = PHashBlocklist.from_hashes([phash_hex(astronaut)])
    stage = SafetyFilter(blocklist, classifier=lambda img: calls.append(img) or 0.0)
    out, reason, fields = stage.apply(jpeg_copy(astronaut, (256, 256)))
    d = fields["phash_distance"]
    assert out is None and reason == f"phash_blocklist(d={d})" and d <= 4 and calls == []
    assert fields["unsafe_score"] is None and fields["faces_blurred"] is None


def test_filter_drops_unsafe_images():
    stage = SafetyFilter(None, load_classifier("tests.data_curation.test_safety:fake_classifier"))
    out, reason, fields = stage.apply(Image.new("RGB", (64, 64), (240, 10, 10)))
    score = fields["unsafe_score"]
    assert out is None and reason == f"unsafe({score:.2f}>0.5)" and score > 0.9


def test_filter_keeps_and_blurs(astronaut, coffee, blurrer):
    stage = SafetyFilter(PHashBlocklist.from_hashes([phash_hex(coffee)]), fake_classifier,
                         classifier_threshold=0.6, blurrer=blurrer)
    out, reason, fields = stage.apply(astronaut)
    assert reason is None and fields["faces_blurred"] == 1 and fields["phash"] == phash_hex(astronaut)
    assert fields["phash_distance"] > 8 and 0 < fields["unsafe_score"] < 0.6
    assert np.array_equal(np.asarray(out), np.asarray(blurrer.blur(astronaut)[0]))
    out, reason, fields = SafetyFilter(None, None, blur_faces=False).apply(astronaut)
    assert out is astronaut and reason is None
    assert fields == {"phash": phash_hex(astronaut), "phash_distance": None, "unsafe_score": None,
                      "faces_blurred": None}


def test_classifier_returning_nan_is_an_error():
    stage = SafetyFilter(None, lambda img: float("nan"), blur_faces=False)
    with pytest.raises(SafetyModelError, match="returned nan"):
        stage.apply(Image.new("RGB", (8, 8)))
