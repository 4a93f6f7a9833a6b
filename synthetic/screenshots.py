"""Rendered web pages with their code and text as targets (Llama 3 sec. 7.1's screenshot parsing), for the
annealing builder ``scripts.build_screenshots``.

    page = template_page(seed=0, index=7)        # .html (a whole document), .texts (its visible text, in order)
    shot = shoot(driver, "file:///tmp/p.html", random.Random(0), 640, 480)   # a Selenium driver (common.browser)
    shot.png, shot.marked_png, shot.element, shot.rect, shot.text

Templates: a nav bar (half the pages) above 1-2 content blocks (form, table, list, cards, heading + paragraph)
with random words, colours, fonts, spacing and layout (stacked, or side by side when stacked would not fit the
640 x 480 viewport), drawn from sample ``index``'s own generator, so sample i is the same whatever the number of
pages. ``Page.texts`` is the visible text the template wrote, in document order: the browser's innerText of the
page, word for word (the tests check it). The HTML is written the way the browser serialises it
(double-quoted attributes, explicit ``<tbody>``, ``checked=""``, no ``/>``, single spaces): the marked element's
``outerHTML`` is then character for character the template's own text for it.

`shoot` loads one page into a fixed viewport and returns two targets:

- element: one element is picked (``mark_rng``) among those drawn fully inside the viewport, at least
  ``MIN_SIDE`` px on each side, whose ``outerHTML`` is at most ``MAX_HTML`` characters; a red frame is drawn
  around its bounding rect with PIL on a copy of the screenshot (the page itself is not touched: an injected
  outline would show up in the outerHTML). The target is `normalise_html` of its ``outerHTML``: the DOM's
  serialisation (what the page wrote, after parsing: for a given page, attribute quotes, entities, void tags and
  inserted ``<tbody>`` follow the HTML serialisation rules) with each whitespace run made one space.
- text: ``document.body.innerText`` with each whitespace run made one space (`normalise_text`), the whole page's
  text as an OCR target; a page whose content overflows the viewport has text outside the image, and is refused.

Problems of the page itself are reasons on the `Shot` (``element_error``, ``text_error``); a page that does not
load in time is the caller's (a Selenium ``TimeoutException``). The element pick depends on the layout, which
depends on Chromium's fonts: the same seed gives the same targets with the same Chromium; PNG bytes may differ
between Chromium versions (text rasterisation), so they are not part of the reproducibility promise.
"""

from __future__ import annotations

import html as htmllib
import io
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

CONTENT = ("form", "table", "list", "cards", "article")  # below an optional nav bar
# a generous height of each block at the largest font (px): two whose sum passes STACKED_PX go side by side
HEIGHT = {"form": 250, "table": 150, "list": 150, "cards": 150, "article": 130}
STACKED_PX = 330
BUTTON = 'button type="button"'
MIN_SIDE = 8  # px: a smaller element cannot carry a visible frame
MAX_HTML = 400  # characters of outerHTML: a target, not a page dump
MARK = (255, 0, 0)
MARK_WIDTH, MARK_GAP = 3, 1  # the frame's width and its distance from the element's rect, in px
PROMPTS = {"element": "What is the HTML of the marked element?", "text": "Read all the text on this page."}
WORDS = ("account", "orange", "river", "garden", "report", "ticket", "summer", "delta", "harbor", "pixel",
         "market", "violet", "number", "canyon", "silver", "letter", "meadow", "rocket", "basket", "forest",
         "window", "planet", "copper", "signal", "island", "marble", "thunder", "velvet", "lantern", "cobalt",
         "order", "status", "price", "total", "name", "email", "city", "date", "notes", "team")
FONTS = ("Arial, sans-serif", "Georgia, serif", "Verdana, sans-serif", "'Courier New', monospace",
         "Tahoma, sans-serif", "'Times New Roman', serif")

# Candidates and text in one call: the body's innerText, the content size, and every element under the body
# with its rect and outerHTML (hidden ones have a zero rect and fail the size rule).
PAGE_JS = """
const out = {text: document.body ? document.body.innerText : "",
             scroll: [document.documentElement.scrollWidth, document.documentElement.scrollHeight],
             elements: []};
if (document.body) for (const el of document.body.querySelectorAll("*")) {
  if (["SCRIPT", "STYLE", "BR", "NOSCRIPT", "TEMPLATE", "META", "LINK"].includes(el.tagName)) continue;
  const r = el.getBoundingClientRect();
  out.elements.push({html: el.outerHTML, rect: [r.left, r.top, r.right, r.bottom]});
}
return out;
"""


@dataclass(frozen=True)
class Page:
    html: str  # the whole document
    texts: tuple[str, ...]  # every text piece the page shows, in document order (its innerText, word for word)
    blocks: tuple[str, ...]


@dataclass(frozen=True)
class Shot:
    png: bytes  # the viewport, unmarked
    marked_png: bytes | None  # with the frame around the element (None: element_error)
    element: str | None  # the marked element's normalised outerHTML
    rect: tuple[int, int, int, int] | None  # its bounding rect in image pixels (x0, y0, x1, y1), x1 / y1 exclusive
    text: str  # the page's normalised innerText (kept when text_error refuses it as a target)
    element_error: str | None
    text_error: str | None

    def conversation(self, task: str) -> list[dict[str, str]]:
        """The trainer's conversation for ``task`` (element | text): the image and the prompt -> the target."""
        target = self.element if task == "element" else self.text
        return [{"role": "user", "content": f"<|image|>{PROMPTS[task]}"}, {"role": "assistant", "content": target}]


def normalise_text(text: str) -> str:
    return " ".join(text.split())


def normalise_html(html: str) -> str:
    """Each whitespace run -> one space, ends stripped (inside attribute values and ``<pre>`` too: a target to
    read off an image, where layout whitespace is not visible as characters)."""
    return " ".join(html.split())


# ------------------------------------------------------------------------------------------- templates


class _Writer:
    """Collects the page's HTML and, beside it, its visible text pieces."""

    def __init__(self, rng: random.Random):
        self.rng, self.parts, self.texts = rng, [], []

    def words(self, lo: int, hi: int, title: bool = False) -> str:
        ws = [self.rng.choice(WORDS) for _ in range(self.rng.randint(lo, hi))]
        text = " ".join(ws)
        return text.title() if title else text.capitalize()

    def text(self, text: str) -> str:
        self.texts.append(text)
        return htmllib.escape(text, quote=False)

    def tag(self, tag: str, lo: int, hi: int, title: bool = True) -> str:
        """``<tag>`` (its attributes after the name) around ``lo``..``hi`` random words, title case for headings,
        links and buttons."""
        return f"<{tag}>{self.text(self.words(lo, hi, title))}</{tag.split()[0]}>"


def _hsl(h: int, s: int, lum: int) -> str:
    return f"hsl({h}, {s}%, {lum}%)"


def _nav(w: _Writer) -> str:
    brand = w.tag('b class="brand"', 1, 2)
    links = "".join(w.tag('a href="#"', 1, 1) for _ in range(w.rng.randint(3, 5)))
    return f'<nav class="nav">{brand}{links}</nav>'


def _form(w: _Writer) -> str:
    fields = [w.tag("h2", 1, 3)]
    for _ in range(w.rng.randint(2, 3)):
        kind = w.rng.choice(("text", "email", "number"))
        fields.append(f'<label class="field">{w.text(w.words(1, 2, title=True))}<input type="{kind}"></label>')
    if w.rng.random() < 0.5:
        checked = ' checked=""' if w.rng.random() < 0.5 else ""
        fields.append(f'<label class="check"><input type="checkbox"{checked}>{w.text(w.words(2, 3))}</label>')
    fields.append(w.tag(BUTTON, 1, 1))
    return f'<form class="form">{"".join(fields)}</form>'


def _table(w: _Writer) -> str:
    n_cols, n_rows = w.rng.randint(2, 4), w.rng.randint(2, 4)
    head = "".join(w.tag("th", 1, 1) for _ in range(n_cols))
    rows = []
    for _ in range(n_rows):
        cells = [w.text(w.words(1, 1))] + [w.text(str(w.rng.randint(0, 999))) for _ in range(n_cols - 1)]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f'<table class="tbl"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _list(w: _Writer) -> str:
    title = w.tag("h3", 1, 2)
    items = "".join(w.tag("li", 1, 4, title=False) for _ in range(w.rng.randint(3, 5)))
    return f'<section class="list">{title}<ul>{items}</ul></section>'


def _cards(w: _Writer) -> str:
    cards = [f'<div class="card">{w.tag("h3", 1, 2)}{w.tag("p", 3, 6, title=False)}'
             f"{w.tag(BUTTON, 1, 1)}</div>" for _ in range(w.rng.randint(2, 3))]
    return f'<div class="cards">{"".join(cards)}</div>'


def _article(w: _Writer) -> str:
    return f'<article class="article">{w.tag("h1", 2, 4)}{w.tag("p", 6, 14, title=False)}</article>'


_BLOCK = {"form": _form, "table": _table, "list": _list, "cards": _cards, "article": _article}


def _style(rng: random.Random, side_by_side: bool) -> str:
    hue, accent = rng.randrange(360), rng.randrange(360)
    dark = rng.random() < 0.3
    bg, fg = (_hsl(hue, 25, 12), _hsl(hue, 15, 92)) if dark else (_hsl(hue, 30, 97), _hsl(hue, 25, 12))
    panel = _hsl(hue, 20, 20) if dark else _hsl(hue, 25, 90)
    font, size, pad = rng.choice(FONTS), rng.randint(12, 15), rng.randint(6, 12)
    radius = rng.choice((0, 4, 8))
    main = ("flex-direction: row; align-items: flex-start; } .main > * { flex: 1 1 0; min-width: 0;" if side_by_side
            else "flex-direction: column;")
    return (f"body {{ margin: 0; padding: {pad}px; background: {bg}; color: {fg}; font: {size}px {font}; "
            f"display: flex; flex-direction: column; gap: {pad}px; }} "
            f".main {{ display: flex; gap: {pad}px; {main} }} "
            f"h1 {{ font-size: {size + 7}px; margin: 0 0 4px; }} h2, h3 {{ font-size: {size + 3}px; margin: 0; }} "
            f"p {{ margin: 0; }} "
            f".nav {{ display: flex; gap: {pad + 4}px; align-items: center; padding: {pad}px; "
            f"background: {_hsl(accent, 55, 35)}; border-radius: {radius}px; }} "
            f".nav a {{ color: white; text-decoration: none; }} .nav .brand {{ color: white; }} "
            f".form {{ display: flex; flex-direction: column; gap: 6px; padding: {pad}px; background: {panel}; "
            f"border-radius: {radius}px; }} "
            f".field {{ display: flex; flex-direction: column; gap: 2px; }} .check {{ display: block; }} "
            f"button {{ background: {_hsl(accent, 60, 45)}; color: white; border: 0; padding: 4px 10px; "
            f"border-radius: {radius}px; font: inherit; align-self: flex-start; }} "
            f".tbl {{ border-collapse: collapse; }} .tbl th, .tbl td {{ border: 1px solid {_hsl(hue, 15, 60)}; "
            f"padding: 2px 8px; }} .tbl th {{ background: {panel}; }} "
            f".list ul {{ margin: 4px 0 0; padding-left: 20px; }} "
            f".cards {{ display: flex; gap: {pad}px; }} .card {{ display: flex; flex-direction: column; gap: 4px; "
            f"padding: {pad}px; flex: 1 1 0; min-width: 0; background: {panel}; border-radius: {radius}px; }} "
            f".article {{ max-width: 560px; }}")


def template_page(seed: int, index: int, stream: str = "screenshots") -> Page:
    """Sample ``index`` of ``seed``: a nav bar (half the pages) above 1-2 content blocks, stacked when their
    estimated heights fit the 480 px viewport, else side by side, in a random style."""
    from synthetic.charts import sample_rng

    rng = sample_rng(seed, index, stream)
    nav = rng.random() < 0.5
    content = rng.sample(CONTENT, rng.randint(1, 2))
    side_by_side = len(content) == 2 and (sum(HEIGHT[b] for b in content) > STACKED_PX or rng.random() < 0.3)
    style = _style(rng, side_by_side)
    w = _Writer(rng)
    top = _nav(w) if nav else ""
    main = "".join(_BLOCK[b](w) for b in content)
    title = w.words(1, 2, title=True)  # not visible: <title> is not part of the body's text
    html = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{htmllib.escape(title)}</title>'
            f'<style>{style}</style></head><body>{top}<main class="main">{main}</main></body></html>')
    return Page(html, tuple(w.texts), ("nav",) * nav + tuple(content))


# ------------------------------------------------------------------------------------------- shooting


def _pixel_rect(rect: list[float], width: int, height: int) -> tuple[int, int, int, int] | None:
    """The element's rect in whole pixels (outward), or None when it is not fully inside the viewport."""
    x0, y0, x1, y1 = math.floor(rect[0]), math.floor(rect[1]), math.ceil(rect[2]), math.ceil(rect[3])
    if x0 < 0 or y0 < 0 or x1 > width or y1 > height or x1 - x0 < MIN_SIDE or y1 - y0 < MIN_SIDE:
        return None
    return x0, y0, x1, y1


def draw_mark(png: bytes, rect: tuple[int, int, int, int]) -> bytes:
    """A red frame ``MARK_WIDTH`` px wide, ``MARK_GAP`` px outside ``rect`` (clipped to the image)."""
    img = Image.open(io.BytesIO(png)).convert("RGB")
    x0, y0, x1, y1 = rect
    g, wd = MARK_GAP, MARK_WIDTH
    ImageDraw.Draw(img).rectangle((x0 - g - wd, y0 - g - wd, x1 - 1 + g + wd, y1 - 1 + g + wd), outline=MARK,
                                  width=wd)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def shoot(driver, url: str, mark_rng: random.Random, width: int, height: int) -> Shot:
    """Load ``url`` in ``driver`` (its viewport ``width`` x ``height``) -> the screenshot and both targets."""
    driver.get(url)
    page = driver.execute_script(PAGE_JS)
    png = driver.get_screenshot_as_png()
    size = Image.open(io.BytesIO(png)).size
    if size != (width, height):
        raise RuntimeError(f"the screenshot is {size[0]} x {size[1]}, not the {width} x {height} viewport")
    candidates = []
    for el in page["elements"]:
        rect = _pixel_rect(el["rect"], width, height)
        html = normalise_html(el["html"])
        if rect is not None and html and len(html) <= MAX_HTML:
            candidates.append((html, rect))
    element = rect = marked = element_error = None
    if candidates:
        element, rect = mark_rng.choice(candidates)
        marked = draw_mark(png, rect)
    else:
        element_error = (f"no markable element (fully inside the {width} x {height} viewport, at least {MIN_SIDE} "
                         f"px a side, outerHTML at most {MAX_HTML} characters)")
    text, text_error = normalise_text(page["text"]), None
    scroll_w, scroll_h = page["scroll"]
    if scroll_w > width or scroll_h > height:
        text_error = (f"the page's content ({scroll_w} x {scroll_h}) overflows the {width} x {height} viewport: its "
                      "text is not all in the image")
    elif not text:
        text_error = "empty page text (the body shows no text)"
    return Shot(png, marked, element, rect, text, element_error, text_error)


def page_rng(seed: int, index: int) -> random.Random:
    """The generator that picks page ``index``'s marked element (not the template's: a given page has none)."""
    from synthetic.charts import sample_rng

    return sample_rng(seed, index, "screenshots-mark")

