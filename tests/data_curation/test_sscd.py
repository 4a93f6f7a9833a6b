"""SSCD descriptor model: architecture, loading (state dict / TorchScript), preprocessing, embeddings.

No SSCD weights exist offline, so the model runs with random weights; the near-duplicate test checks that
the pipeline (preprocessing, GeM, projection, normalisation) keeps a crop + JPEG copy closest to its
original on real photos, which holds for the seeded random tiny network used here.
"""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from data_curation.sscd import (GeM, SSCDEmbedder, SSCDLoadError, SSCDModel, build_sscd, build_sscd_resnet50,
                                preprocess)

from skimage import data as skdata  # noqa: E402  (a dev dependency)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry", "hubble_deep_field", "coins")


def photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skdata, name)()).convert("RGB")


def near_duplicate(img: Image.Image, keep: float = 0.9, quality: int = 40) -> Image.Image:
    """Central crop to 90% of each side, then JPEG re-compression at quality 40."""
    w, h = img.size
    cw, ch = int(w * keep), int(h * keep)
    left, top = (w - cw) // 2, (h - ch) // 2
    buf = io.BytesIO()
    img.crop((left, top, left + cw, top + ch)).save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def tiny_model(seed: int = 0) -> SSCDModel:
    torch.manual_seed(seed)
    return build_sscd("tiny")


def small_images(n: int = 3) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(40, 30), (30, 40), (40, 30), (36, 36)]
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in (sizes * n)[:n]]


def test_gem_is_the_generalised_mean():
    x = torch.rand(2, 5, 3, 4) + 0.1
    torch.testing.assert_close(GeM(3.0)(x), x.pow(3).mean(dim=(2, 3)).pow(1 / 3))
    torch.testing.assert_close(GeM(1.0)(x), x.mean(dim=(2, 3)))
    assert (GeM(3.0)(-torch.ones(1, 2, 2, 2)) > 0).all()  # clamped at 1e-6, as SSCD does


def test_resnet50_architecture_on_two_small_images():
    torch.manual_seed(0)
    model = build_sscd_resnet50()
    bb = model.backbone
    assert isinstance(bb.avgpool, GeM) and bb.avgpool.p == 3.0
    assert (bb.fc.in_features, bb.fc.out_features) == (2048, 512)
    # torchvision ResNet-50 without its fc (23,508,032) + the 2048 -> 512 projection
    assert sum(p.numel() for p in model.parameters()) == 23_508_032 + 2048 * 512 + 512
    emb = SSCDEmbedder.from_module(model, size=64).embed([photo("astronaut"), photo("coffee")])
    assert emb.shape == (2, 512) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_preprocess_matches_the_readme_transforms():
    normalize = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    small_288 = transforms.Compose([transforms.Resize(288), transforms.ToTensor(), normalize])
    skew_320 = transforms.Compose([transforms.Resize([320, 320]), transforms.ToTensor(), normalize])
    img = photo("coffee")  # 600 x 400
    x = preprocess(img)
    assert x.shape == (3, 288, 432)
    torch.testing.assert_close(x, small_288(img))
    torch.testing.assert_close(preprocess(img, "square", 320), skew_320(img))
    assert preprocess(Image.new("L", (50, 100)), "short", 64).shape == (3, 128, 64)  # grey -> RGB, W x H
    with pytest.raises(ValueError, match="resize mode"):
        preprocess(img, "crop")


def test_embed_groups_shapes_and_keeps_order():
    emb = SSCDEmbedder.from_module(tiny_model(), size=32)
    imgs = small_images(10)
    one_by_one = np.concatenate([emb.embed([im]) for im in imgs])
    for batch_size in (1, 2, 32):  # batch_size 1: two preprocessing windows of 8
        np.testing.assert_allclose(emb.embed(imgs, batch_size=batch_size), one_by_one, atol=1e-5)
    assert emb.embed([]).shape == (0, 512)


def test_state_dict_round_trip(tmp_path):
    model = tiny_model(1)
    imgs = small_images()
    ref = SSCDEmbedder.from_module(model, size=32).embed(imgs)
    torch.save(model.state_dict(), tmp_path / "ours.pt")
    loaded = SSCDEmbedder.load(tmp_path / "ours.pt", size=32)
    assert loaded.model.cfg == model.cfg
    np.testing.assert_array_equal(loaded.embed(imgs), ref)
    # a bare torchvision ResNet state dict (no "backbone." prefix) wrapped in {"state_dict": ...}
    bare = {k.removeprefix("backbone."): v for k, v in model.state_dict().items()}
    torch.save({"state_dict": bare}, tmp_path / "bare.pt")
    np.testing.assert_array_equal(SSCDEmbedder.load(tmp_path / "bare.pt", size=32).embed(imgs), ref)


@pytest.mark.filterwarnings("ignore:`torch.jit.(script|trace):FutureWarning")
def test_torchscript_round_trip(tmp_path):
    model = tiny_model(2)
    imgs = small_images()
    ref = SSCDEmbedder.from_module(model, size=32).embed(imgs)
    torch.jit.script(model).save(str(tmp_path / "sscd.torchscript.pt"))
    loaded = SSCDEmbedder.load(tmp_path / "sscd.torchscript.pt", size=32)
    assert isinstance(loaded.model, torch.jit.ScriptModule)
    np.testing.assert_allclose(loaded.embed(imgs), ref, atol=1e-6)
    assert loaded.dim == 512
    # a traced export without the final L2 norm still gives unit descriptors
    torch.jit.trace(model.backbone, torch.zeros(1, 3, 32, 32)).save(str(tmp_path / "raw.pt"))
    raw = SSCDEmbedder.load(tmp_path / "raw.pt", size=32).embed(imgs)
    np.testing.assert_allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(raw, ref, atol=1e-5)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(SSCDLoadError, match="missing.pt.*not found"):
        SSCDEmbedder.load(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a model at all")
    with pytest.raises(SSCDLoadError, match="garbage.pt"):
        SSCDEmbedder.load(tmp_path / "garbage.pt")
    torch.save(torch.nn.Linear(3, 4).state_dict(), tmp_path / "linear.pt")
    with pytest.raises(SSCDLoadError, match="linear.pt.*not an SSCD"):
        SSCDEmbedder.load(tmp_path / "linear.pt")
    sd = tiny_model().state_dict()
    sd["backbone.extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "extra.pt")
    with pytest.raises(SSCDLoadError, match="extra.pt.*unexpected.*backbone.extra.weight"):
        SSCDEmbedder.load(tmp_path / "extra.pt")


@pytest.mark.parametrize("seed", [0, 1])
def test_near_duplicate_is_closest_to_its_original(seed):
    originals = [photo(n) for n in PHOTOS]
    copies = [near_duplicate(im) for im in originals]
    emb = SSCDEmbedder.from_module(tiny_model(seed), resize="square", size=96)
    sims = emb.embed(copies) @ emb.embed(originals).T  # (copies, originals)
    assert (sims.argmax(axis=1) == np.arange(len(PHOTOS))).all(), np.round(sims, 3)
