"""load_image: every odd file a crawl produces either loads as correct RGB or raises ImageLoadError."""

import io
import pickle
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from media.image import ImageLoadError, load_image, load_image_bytes, to_rgb


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def rgb(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


def expect_error(path, match: str = "", **kwargs) -> ImageLoadError:
    with pytest.raises(ImageLoadError) as info:
        load_image(path, **kwargs)
    msg = str(info.value)
    assert msg.startswith(f"{path}: "), msg
    assert match in msg, msg
    return info.value


# ---------------------------------------------------------------- files that must be rejected


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope.jpg", "not found")


def test_directory(tmp_path):
    expect_error(tmp_path, "directory")


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    expect_error(p, "empty")


def test_text_file_named_jpg(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("this is not a picture\n" * 20)
    expect_error(p, "not a recognised image")


def test_random_bytes(tmp_path):
    p = tmp_path / "garbage.png"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    expect_error(p)


def test_truncated_jpeg(tmp_path):
    buf = io.BytesIO()
    noise_image(128, 128).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    p = tmp_path / "half.jpg"
    p.write_bytes(data[: len(data) // 2])
    # The header parses; only the full decode inside load_image notices the missing half.
    Image.open(p).close()
    expect_error(p, "truncated")


def test_corrupt_png_payload(tmp_path):
    data = bytearray(png_bytes(noise_image(64, 64)))
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # clobber part of the IDAT stream
    p = tmp_path / "broken.png"
    p.write_bytes(bytes(data))
    expect_error(p, "cannot decode")


def _png_claiming_size(width: int, height: int) -> bytes:
    """A small valid PNG whose IHDR is rewritten to claim width x height (CRC fixed up)."""
    data = bytearray(png_bytes(Image.new("RGB", (8, 8))))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_decompression_bomb_small_limit(tmp_path):
    p = tmp_path / "big.png"
    noise_image(100, 100).save(p)
    err = expect_error(p, "10000", max_pixels=5000)
    assert "5000" in err.reason
    assert load_image(p, max_pixels=10_000).size == (100, 100)


def test_decompression_bomb_real_pil_limits(tmp_path):
    # 12000^2 = 1.44e8 pixels: above PIL's warning threshold (~8.9e7), below its hard error (~1.79e8).
    # Our limit decides, from the header alone, and PIL's warning must not leak out.
    p = tmp_path / "warn_zone.png"
    p.write_bytes(_png_claiming_size(12000, 12000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        expect_error(p, "144000000", max_pixels=100_000_000)
    # 20000^2 = 4e8 pixels: PIL itself raises DecompressionBombError while opening.
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_claiming_size(20000, 20000))
    expect_error(p, "400000000")
    expect_error(p, "decompression bomb", max_pixels=10**12)


def test_bytes_and_file_object_sources(tmp_path):
    img = noise_image(9, 5)
    data = png_bytes(img)
    assert np.array_equal(rgb(load_image(data)), np.asarray(img))
    assert np.array_equal(rgb(load_image(memoryview(data))), np.asarray(img))
    with pytest.raises(ImageLoadError, match=r"^shard-00001/key42: "):
        load_image_bytes(b"\x89PNG garbage", name="shard-00001/key42")
    with pytest.raises(ImageLoadError, match=r"^<bytes>: empty"):
        load_image(b"")
    p = tmp_path / "f.png"
    p.write_bytes(data)
    with open(p, "rb") as f:
        assert np.array_equal(rgb(load_image(f)), np.asarray(img))
        assert not f.closed  # the caller's file is left open
    with open(p, "rb") as f:
        f.read(10)  # PIL seeks back to the start, so a partly read file still loads
        assert load_image(f).size == (9, 5)
    with pytest.raises(ImageLoadError, match=r"^<file object>: not a recognised"):
        load_image(io.BytesIO(b"plain text, no image here"))


def test_error_is_picklable_value_error():
    err = ImageLoadError("a/b.jpg", "empty file (0 bytes)")
    assert isinstance(err, ValueError)
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == "a/b.jpg: empty file (0 bytes)" and again.name == "a/b.jpg"


# ---------------------------------------------------------------- files that must load correctly


def test_rgb_roundtrip_and_1x1(tmp_path):
    p = tmp_path / "one.png"
    Image.new("RGB", (1, 1), (12, 34, 56)).save(p)
    img = load_image(p)
    assert img.size == (1, 1) and rgb(img)[0, 0].tolist() == [12, 34, 56]
    p = tmp_path / "noise.png"
    src = noise_image(31, 17)
    src.save(p)
    assert np.array_equal(rgb(load_image(str(p))), np.asarray(src))


def test_grayscale_and_1bit(tmp_path):
    p = tmp_path / "grey.png"
    Image.new("L", (4, 3), 77).save(p)
    assert (rgb(load_image(p)) == 77).all()
    p = tmp_path / "bits.png"
    bits = Image.new("1", (4, 2), 0)
    bits.putpixel((1, 0), 1)
    bits.save(p)
    out = rgb(load_image(p))
    assert out[0, 1].tolist() == [255, 255, 255] and out[0, 0].tolist() == [0, 0, 0]


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(p, "JPEG", quality=95)  # pure red ink
    with Image.open(p) as raw:
        assert raw.mode == "CMYK"
    out = rgb(load_image(p))
    assert np.abs(out - np.array([255, 0, 0])).max() <= 3


def test_palette_png_with_transparency_composites_on_white(tmp_path):
    pal = Image.new("P", (4, 1))
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0] * (254 * 3))  # index 0 black, index 1 green
    pal.putdata([0, 1, 0, 1])
    p = tmp_path / "pal.png"
    pal.save(p, transparency=0)  # index 0 is fully transparent
    with Image.open(p) as raw:
        assert raw.mode == "P" and "transparency" in raw.info
    out = rgb(load_image(p))
    assert out[0].tolist() == [[255, 255, 255], [0, 200, 0], [255, 255, 255], [0, 200, 0]]
    p = tmp_path / "pal_opaque.png"
    pal.save(p)
    assert rgb(load_image(p))[0, 0].tolist() == [0, 0, 0]


def test_rgba_and_la_composite_on_white(tmp_path):
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(200, 100, 50, 128), (0, 0, 0, 0), (10, 20, 30, 255)])
    p = tmp_path / "rgba.png"
    rgba.save(p)
    out = rgb(load_image(p))
    a = 128 / 255
    expected = np.array([200, 100, 50]) * a + 255 * (1 - a)
    assert np.abs(out[0, 0] - expected).max() <= 1
    assert out[0, 1].tolist() == [255, 255, 255]  # transparent black shows the white background
    assert out[0, 2].tolist() == [10, 20, 30]
    la = Image.new("LA", (1, 1), (0, 64))
    p = tmp_path / "la.png"
    la.save(p)
    assert np.abs(rgb(load_image(p))[0, 0] - 255 * (1 - 64 / 255)).max() <= 1


def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100, 65535, 1000]], dtype=np.uint16)
    p = tmp_path / "depth16.png"
    Image.fromarray(values).save(p)
    with Image.open(p) as raw:
        assert raw.mode in ("I;16", "I")
    out = rgb(load_image(p))
    assert out[0, :, 0].tolist() == [0, 100, 255, 4]
    assert (out == out[..., :1]).all()  # grey replicated into all channels


def test_int32_and_float_modes():
    i32 = Image.fromarray(np.array([[-5, 0, 32896, 70000]], dtype=np.int32))
    assert i32.mode == "I"
    assert rgb(to_rgb(i32))[0, :, 0].tolist() == [0, 0, 128, 255]
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0, np.nan, -1.0]], dtype=np.float32))
    assert f.mode == "F"
    assert rgb(to_rgb(f))[0, :, 1].tolist() == [0, 128, 255, 255, 0, 0]


def test_float_tiff_file(tmp_path):
    p = tmp_path / "float.tif"
    Image.fromarray(np.full((2, 3), 0.25, dtype=np.float32)).save(p)
    assert (rgb(load_image(p)) == 64).all()


def test_exif_orientation_6_is_applied(tmp_path):
    # Stored 40 wide x 20 tall: left half red, right half blue. Orientation 6 = "rotate 90 degrees
    # clockwise to display", so the upright image is 20 x 40 with red on top.
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / "rotated.jpg"
    stored.save(p, "JPEG", quality=95, exif=exif.tobytes())
    img = load_image(p)
    assert img.size == (20, 40)
    out = rgb(img)
    assert np.abs(out[8, 10] - [255, 0, 0]).max() <= 10
    assert np.abs(out[32, 10] - [0, 0, 255]).max() <= 10


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "PA", "CMYK", "1", "RGB"])
def test_to_rgb_matches_hf_convert_to_rgb(mode):
    """For 8-bit modes our colour rule is HF's (white behind transparency), bit for bit."""
    import transformers.models.mllama.image_processing_mllama as hf
    src = noise_image(24, 16, seed=5)
    src.putalpha(Image.linear_gradient("L").resize(src.size))
    img = src.convert(mode) if mode != "PA" else src.convert("P").convert("PA")
    assert np.array_equal(np.asarray(to_rgb(img)), np.asarray(hf.convert_to_rgb(img)))
