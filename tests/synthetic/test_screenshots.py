"""synthetic/screenshots.py renders template pages in headless Chromium (common/browser.py) whose targets are the
marked element's outerHTML (the template's own text for it) and the page's innerText (the template's words), with
the red frame around the element's rect; scripts.build_screenshots turns pages into conversation shards the
trainer's codec decodes, a hung page is an error row and the next page still renders, and every sample is
accounted for."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from adapters.chat import IGNORE_INDEX, image_input_id
from common import browser as browser_mod
from common.browser import BrowserError, Chromium, headless_chromium
from scripts import _rendered, build_screenshots
from synthetic.screenshots import (
    MARK_GAP,
    MARK_WIDTH,
    PROMPTS,
    normalise_text,
    page_rng,
    shoot,
    template_page,
)
from tests.system_deps import require_binary
from tests.tiny import conversation_shards

W, H = build_screenshots.WIDTH, build_screenshots.HEIGHT
FIND = "return [...document.body.querySelectorAll('*')].filter(e => e.outerHTML === arguments[0])" \
       ".map(e => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; });"


def rows(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


@pytest.fixture(scope="module")
def chromium():
    require_binary("chromium"), require_binary("chromedriver")
    browser = Chromium(W, H, timeout_s=3)
    yield browser
    browser.close()


def _shoot(chromium, tmp_path, seed: int, i: int):
    page = template_page(seed, i)
    path = tmp_path / f"{seed}_{i}.html"
    path.write_text(page.html)
    return page, shoot(chromium.driver, path.as_uri(), page_rng(seed, i), W, H)


def test_templates_render_with_the_mark_around_the_element_whose_html_is_the_target(chromium, tmp_path):
    blocks = set()
    for i in range(8):
        page, shot = _shoot(chromium, tmp_path, 1, i)
        blocks.update(page.blocks)
        assert shot.element_error is None and shot.text_error is None, (i, shot)
        # the text target is the template's own words, and the browser's innerText
        assert shot.text == normalise_text(" ".join(page.texts))
        assert shot.text == normalise_text(chromium.driver.execute_script("return document.body.innerText"))
        # the element target is the browser's outerHTML, unnormalised, of the element at the marked rect, and
        # the template's own text for it
        assert shot.element in page.html
        rects = chromium.driver.execute_script(FIND, shot.element)
        assert rects, shot.element
        x0, y0, x1, y1 = shot.rect
        assert any(abs(r[0] - x0) < 1 and abs(r[1] - y0) < 1 and abs(r[2] - x1) < 1 and abs(r[3] - y1) < 1
                   for r in rects)
        # the mark: only pixels in the frame band around the rect changed, the rect itself did not, and the frame
        # shows on every side that is inside the image
        before, after = pixels(shot.png), pixels(shot.marked_png)
        changed = np.argwhere(np.abs(after - before).sum(-1) > 0)
        pad = MARK_GAP + MARK_WIDTH
        assert len(changed)
        assert changed[:, 1].min() >= x0 - pad and changed[:, 1].max() < x1 + pad
        assert changed[:, 0].min() >= y0 - pad and changed[:, 0].max() < y1 + pad
        assert (np.abs(after[y0:y1, x0:x1] - before[y0:y1, x0:x1]).sum() == 0)
        red = (after == (255, 0, 0)).all(-1)
        mid_y, mid_x = (y0 + y1) // 2, (x0 + x1) // 2
        if x0 - pad >= 0:
            assert red[mid_y, x0 - pad]
        if x1 + pad - 1 < W:
            assert red[mid_y, x1 + pad - 1]
        if y0 - pad >= 0:
            assert red[y0 - pad, mid_x]
        if y1 + pad - 1 < H:
            assert red[y1 + pad - 1, mid_x]
    assert len(blocks) >= 4  # several kinds of blocks in eight pages
    assert shot.conversation("text") == [{"role": "user", "content": "<|image|>" + PROMPTS["text"]},
                                         {"role": "assistant", "content": shot.text}]


def test_same_seed_same_targets_and_sample_i_whatever_n(chromium, tmp_path):
    """PNG bytes are not compared: they may differ between Chromium versions (text rasterisation)."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    for i in range(3):
        assert template_page(4, i) == template_page(4, i)
        assert template_page(5, i).html != template_page(4, i).html
        (_, a), (_, b) = _shoot(chromium, tmp_path / "a", 4, i), _shoot(chromium, tmp_path / "b", 4, i)
        assert (a.element, a.rect, a.text) == (b.element, b.rect, b.text)


def test_missing_chromium_is_a_browser_error_naming_the_apt_packages(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(browser_mod, "FALLBACK", {"chromium": str(tmp_path / "chromium"),
                                                  "chromedriver": str(tmp_path / "chromedriver")})
    with pytest.raises(BrowserError, match="apt-get install chromium chromium-driver"):
        Chromium(W, H)
    assert build_screenshots.main([str(tmp_path / "o"), "--n", "1"]) == 2
    assert not (tmp_path / "o").exists()


def test_headless_chromium_has_the_exact_viewport(tmp_path):
    require_binary("chromium"), require_binary("chromedriver")
    (tmp_path / "p.html").write_text("<html><body style='margin:0'><div id='d'>x</div></body></html>")
    with headless_chromium(320, 200) as driver:
        driver.get((tmp_path / "p.html").as_uri())
        assert driver.execute_script("return [innerWidth, innerHeight, devicePixelRatio]") == [320, 200, 1]
        assert Image.open(io.BytesIO(driver.get_screenshot_as_png())).size == (320, 200)


PAGES = {  # name -> (bytes, element status/reason, text status/reason)
    "a_good.html": (b"<html><body><p>Hello <b>there</b></p></body></html>", None, None),
    "b_loop.html": (b"<html><body><p>spin</p><script>while (true) {}</script></body></html>",
                    "did not render within 2 s", "did not render within 2 s"),
    "c_next.html": (b"<html><body><p>after the loop</p></body></html>", None, None),
    "d_latin1.html": (b"<html><body><p>caf\xe9</p></body></html>", "not UTF-8 (byte 0xe9", "not UTF-8 (byte 0xe9"),
    "e_nomark.html": (b"<html><body>only text</body></html>", "no markable element", None),
    "f_notext.html": (b"<html><body><div style='width:40px;height:40px;background:blue'></div></body></html>",
                      None, "empty page text"),
    "g_tall.html": (b"<html><body><p>top</p><div style='height:2000px'></div></body></html>", None, "overflows"),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """build_screenshots end to end: 3 template pages, and the bad pages above through --html."""
    require_binary("chromium"), require_binary("chromedriver")
    tmp = tmp_path_factory.mktemp("screenshots")
    cfg = yaml.safe_load(Path(_rendered.DEFAULT_CONFIG).read_text())
    (tmp / "cfg.yaml").write_text(yaml.safe_dump({**cfg, "workers": 1}))  # the shipped config, in-process
    (tmp / "html").mkdir()
    for name, (data, _, _) in PAGES.items():
        (tmp / "html" / name).write_bytes(data)
    templates = [str(tmp / "t"), "--n", "3", "--seed", "2", "--config", str(tmp / "cfg.yaml"), "--json"]
    given = [str(tmp / "h"), "--html", str(tmp / "html"), "--timeout", "2", "--config", str(tmp / "cfg.yaml"),
             "--json"]
    assert build_screenshots.main(templates) == 0
    assert build_screenshots.main(given) == 0
    return tmp, templates, given


def test_bad_pages_are_error_rows_and_the_counts_add_up(built):
    tmp, _, _ = built
    out = tmp / "h"
    report = json.loads((out / "report.json").read_text())
    status = {r["id"]: r for r in rows(out / "build_status.jsonl")}
    assert len(status) == 2 * len(PAGES) == report["samples"]
    for i, (name, (_, element, text)) in enumerate(PAGES.items()):
        for task, want in (("element", element), ("text", text)):
            row = status[f"{i:06d}_{task}"]
            assert row["source"] == name
            assert (row["status"], want is None or want in row["reason"]) == ("ok" if want is None else "error",
                                                                              True), row
    assert status["000002_text"]["status"] == "ok"  # the page after the hung one renders
    assert report["browser_starts"] == 2  # the hung page's browser was replaced
    assert report["rendered"] + report["errors"] == report["samples"] and report["rendered"] == 7
    s = report["shards"]
    assert s["inputs"] == 7 and s["kept"] + s["dropped"] + s["error"] == 7 and s["kept"] == 6
    assert s["by_reason"] == {"caption:empty": 1}  # f_notext's element sample: its page shows no text
    sidecar = json.loads((out / "raw" / "000000_element.json").read_text())
    assert sidecar["conversations"][1]["content"] in ("<p>Hello <b>there</b></p>", "<b>there</b>")
    assert sidecar["caption"] == "Hello there"
    tall = json.loads((out / "raw" / "000006_element.json").read_text())
    assert tall["caption"] == "top"  # its text is no target (overflow) but still the element sample's caption


def test_template_build_writes_shards_the_conversation_codec_decodes(built, tmp_path, capsys):
    tmp, templates, _ = built
    out = tmp / "t"
    report = json.loads((out / "report.json").read_text())
    assert report["rendered"] == 6 and report["errors"] == 0 and report["shards"]["kept"] == 6
    assert Image.open(out / "preview.png").format == "PNG"
    raws, metas, tok, codec = conversation_shards(out / "shards", tmp_path / "tok")
    assert len(raws) == 6 and sorted(m["task"] for m in metas) == ["element"] * 3 + ["text"] * 3
    for raw, meta in zip(raws, metas):
        ex = codec.decode(raw)
        assert len(ex.media) == 1 and ex.tokens.count(image_input_id(tok)) == 1
        target = meta["conversations"][1]["content"]
        page = template_page(2, int(meta["page"]))
        assert (target in page.html) if meta["task"] == "element" else target == normalise_text(" ".join(page.texts))
        labelled = [t for t, lab in zip(ex.tokens, ex.labels) if lab != IGNORE_INDEX]
        assert labelled[: len(tok.encode(target))] == tok.encode(target)

    # a rerun with the same arguments resumes (no browser); other arguments over the same OUT: one line, exit 2
    before = (out / "build_status.jsonl").read_bytes()
    assert build_screenshots.main(templates) == 0
    assert json.loads(capsys.readouterr().out) == report and (out / "build_status.jsonl").read_bytes() == before
    assert build_screenshots.main([*templates, "--seed", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("build_screenshots:") and "other arguments" in err and "\n" not in err


def test_help_and_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        build_screenshots.main(["--help"])
    assert e.value.code == 0 and "build_screenshots OUT" in capsys.readouterr().out
    for bad, words in ((["--n", "0"], "--n"), (["--timeout", "0"], "--timeout"), (["--seed", "x"], "--seed"),
                       ([], "required")):
        with pytest.raises(SystemExit) as e:
            build_screenshots.main([str(tmp_path / "o")] * bool(bad) + bad)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("build_screenshots:") and words in err and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    for html, words in ((tmp_path / "empty", "holds no *.html"), (tmp_path / "missing", "is not a folder")):
        assert build_screenshots.main([str(tmp_path / "o"), "--html", str(html)]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1 and not (tmp_path / "o").exists()
