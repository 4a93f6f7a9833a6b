"""web_demo: the chat prompt is the trainer's conversation format, uploads are checked, bad input is one message, video
and speech exports answer as their CLI demos; and in headless Chromium (Debian's chromium + chromedriver through
Selenium) the streamed answer equals demo_vqa's, and a bad or too large file is a visible message."""

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from adapters.chat import Message, encode_dialog, encode_header
from adapters.llama import build_llama
from adapters.model_io import save_checkpoint
from adapters.multimodal import build_multimodal
from common.browser import Chromium
from media.audio import write_audio
from scripts import demo_asr, demo_video, demo_vqa, web_demo
from scripts.web_demo import ChatModel, Media, Turn, UploadError, conversation, read_media
from speech.adapter import build_speech_llama
from speech.model_io import save_speech_checkpoint
from synthetic.motion import QUESTION as ASK_MOTION
from synthetic.motion import make_motion_clips, motion_corpus_text
from tests.speech.corpus import asr_corpus_text
from tests.tiny import build_tiny_tokenizer, build_tiny_vqa_model, tiny_asr_config, tiny_video_config
from training.codecs import encode_conversation

ROOT = Path(__file__).resolve().parents[2]
ASSET = ROOT / "assets" / "coffee.jpg"
QUESTION = "What colour are the shapes?"
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny untrained image export (with its LM and tokenizer) and a file that is not an image, named .jpg."""
    root = tmp_path_factory.mktemp("web_demo")
    tok = build_tiny_tokenizer(root)
    ckpt = save_checkpoint(build_tiny_vqa_model(tok, seed=0), root / "ckpt", tokenizer_path=root / "tokenizer.model")
    bad = root / "notes.jpg"
    bad.write_text("these are notes, not pixels\n")
    return {"ckpt": ckpt, "tok": tok, "bad": bad}


def chat_model(ckpt: Path, **kw) -> ChatModel:
    args = argparse.Namespace(checkpoint=str(ckpt), lm=None, tokenizer=None, max_upload_mb=1.0, frames=None,
                              max_new_tokens=NEW_TOKENS, temperature=0.0, top_p=0.9, top_k=0, seed=None)
    return ChatModel(argparse.Namespace(**{**vars(args), **kw}))


def test_multi_turn_prompt_is_the_trainers_conversation_format(export):
    tok, img = export["tok"], Media("image", "a.jpg", None)
    turns = [Turn("user", "What is it?", [img]), Turn("assistant", "a cup"), Turn("user", "And these?", [img, img]),
             Turn("assistant", "two cups"), Turn("user", "Which colour?")]
    trainer = [Message("user", "<|image|>What is it?"), Message("assistant", "a cup"),
               Message("user", "<|image|><|image|>And these?"), Message("assistant", "two cups"),
               Message("user", "Which colour?")]
    expected = encode_conversation(tok, trainer)[0] + encode_header(tok, "assistant")
    assert encode_dialog(tok, conversation(turns)) == expected
    # the first turn is the CLI demo's prompt
    assert encode_dialog(tok, conversation(turns[:1])) == encode_dialog(tok, [Message("user", "What is it?",
                                                                                      n_images=1)])


def test_uploads_are_checked_for_size_and_kind(export, tmp_path):
    model = chat_model(export["ckpt"]).model
    readers = {"image": lambda p: demo_vqa.tiled_image(model, p),
               "audio": lambda p: web_demo.load_audio(p, max_seconds=None)}
    assert read_media(ASSET, readers, 10 * web_demo.MB).kind == "image"
    wav = write_audio(tmp_path / "tone.wav", np.zeros(1600, np.float32), 16000)
    assert read_media(wav, readers, web_demo.MB).kind == "audio"
    with pytest.raises(UploadError, match=r"coffee.jpg: 0\.\d MB is over the upload limit of 0.01 MB"):
        read_media(ASSET, readers, round(0.01 * web_demo.MB))
    with pytest.raises(UploadError, match=r"^notes.jpg: not an image or audio this checkpoint can read \(") as e:
        read_media(export["bad"], readers, web_demo.MB)
    assert str(export["bad"].parent) not in str(e.value)  # the file's name, not where the server keeps it


def test_bad_input_is_one_error_line_and_the_chat_stays(export):
    chat = chat_model(export["ckpt"])
    assert chat.readers.keys() == {"image"} and not chat.speech
    *_, (shown, turns, box) = chat.respond({"text": QUESTION, "files": [str(ASSET)]}, [], [], NEW_TOKENS, 0, 0.9,
                                           0, "asr", "English")
    assert [t.role for t in turns] == ["user", "assistant"] and shown[-1]["content"] == turns[-1].text
    assert box == web_demo.EMPTY
    for message, max_new, error in [
            ({"text": "and this?", "files": [str(export["bad"])]}, NEW_TOKENS, "Error: notes.jpg: not an image"),
            ({"text": "more", "files": []}, chat.max_seq_len, "Error: --max-new-tokens: the prompt ("),
            ({"text": "more", "files": []}, NEW_TOKENS, "Error: top_p must be in (0, 1]"),
            ({"text": "more", "files": []}, NEW_TOKENS, "Error: top_k must be an integer >= 0")]:
        with pytest.warns(UserWarning):  # gr.Warning outside a request
            out = list(chat.respond(message, shown, turns, max_new, 0, 0.0 if "top_p" in error else 0.9,
                                    -1 if "top_k" in error else 0, "asr", "English"))
        assert len(out) == 1 and out[0][1] is turns and out[0][0][:-1] == [*shown, out[0][0][-2]]
        assert out[0][0][-1]["content"].startswith(error)
        assert out[0][0][-1]["content"].endswith("New chat starts over") == ("--max-new-tokens" in error)


def final(chat: ChatModel, message: dict, max_new: int = 4, turns=()):
    """The last (chat shown, turns, box) of a request: the whole answer."""
    return list(chat.respond(message, [], list(turns), max_new, 0, 0.9, 0, "asr", "English"))[-1]


def test_video_checkpoint_answers_as_demo_video(tmp_path, capsys):
    tok = build_tiny_tokenizer(tmp_path, texts=motion_corpus_text())
    cfg = tiny_video_config(tok, 6)
    ckpt = save_checkpoint(build_multimodal(cfg, build_llama(cfg.lm)), tmp_path / "video",
                           tokenizer_path=tmp_path / "tokenizer.model")
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(make_motion_clips(1, seed=0, max_frames=9)[0].video)
    assert demo_video.main(["--video", str(clip), "--question", ASK_MOTION, "--checkpoint", str(ckpt),
                            "--max-new-tokens", "4", "--frames", "6"]) == 0
    cli = capsys.readouterr().out.removesuffix("\n")
    assert cli
    chat = chat_model(ckpt)
    assert list(chat.readers) == ["image", "video"]
    shown, turns, _ = final(chat, {"text": ASK_MOTION, "files": [str(clip)]})
    assert turns[0].media[0].kind == "video" and shown[-1]["content"] == turns[-1].text == cli
    # a still image in the same chat is an image, and the chat goes on with both
    shown, turns, _ = final(chat, {"text": "And here?", "files": [str(ASSET)]}, turns=turns)
    assert [m.kind for t in turns for m in t.media] == ["video", "image"] and turns[-1].role == "assistant"


def test_speech_checkpoint_transcribes_as_demo_asr(tmp_path, capsys):
    tok = build_tiny_tokenizer(tmp_path, texts=asr_corpus_text())
    ckpt = save_speech_checkpoint(build_speech_llama(tiny_asr_config(tok)), tmp_path / "ckpt",
                                  tmp_path / "tokenizer.model")
    wav = write_audio(tmp_path / "tone.wav", 0.3 * np.sin(np.arange(24_000) / 16_000 * 2 * np.pi * 440), 16_000)
    assert demo_asr.main(["--checkpoint", str(ckpt), "--audio", str(wav), "--max-new-tokens", "4"]) == 0
    cli = capsys.readouterr().out.removesuffix("\n")
    assert cli
    chat = chat_model(ckpt)
    assert chat.speech and list(chat.readers) == ["audio"]
    shown, turns, _ = final(chat, {"text": "", "files": [str(wav)]})
    assert shown[-1]["content"] == turns[-1].text == cli
    with pytest.warns(UserWarning):
        shown, after, _ = final(chat, {"text": "and now?", "files": []}, turns=turns)
    assert after == turns and shown[-1]["content"].startswith("Error: a speech model answers about audio")
    with pytest.warns(UserWarning):
        shown, after, _ = final(chat, {"text": "", "files": [str(ASSET)]}, turns=turns)
    assert after == turns and shown[-1]["content"].startswith("Error: coffee.jpg: not audio this checkpoint can read")


# ------------------------------------------------------------------------------------------------ browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ckpt: Path, port: int, log: Path) -> subprocess.Popen:
    """The demo in a subprocess (output to ``log``), once it answers HTTP (a failed start shows the log)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "scripts.web_demo", "--checkpoint", str(ckpt), "--port",
                                 str(port), "--max-new-tokens", str(NEW_TOKENS), "--max-upload-mb", "1"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"web_demo exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    proc.wait()
    pytest.fail(f"web_demo did not answer on port {port} within 60 s:\n{log.read_text()}")


# Records every text the last bot message shows, as the page changes (polling from Python could miss a fast stream).
RECORD = """
window.__texts = [];
new MutationObserver(() => {
  const bots = document.querySelectorAll('#chat [data-testid="bot"]');
  if (bots.length) window.__texts.push(bots[bots.length - 1].textContent);
}).observe(document.querySelector('#chat'), {subtree: true, childList: true, characterData: true});
"""


def normal(text: str) -> str:
    return " ".join(text.split())


def test_browser_streams_the_cli_answer_and_survives_a_bad_file(export, capsys, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    assert demo_vqa.main(["--image", str(ASSET), "--question", QUESTION, "--checkpoint", str(export["ckpt"]),
                          "--max-new-tokens", str(NEW_TOKENS)]) == 0
    cli = normal(capsys.readouterr().out)
    assert len(cli) > 1
    port = free_port()
    server, browser = start_server(export["ckpt"], port, tmp_path / "server.log"), None
    try:
        browser = Chromium(1200, 1000, block_network=False)  # a fresh profile; the page is served on localhost
        driver = browser.driver
        wait = WebDriverWait(driver, 30, poll_frequency=0.1)
        driver.get(f"http://127.0.0.1:{port}/")

        def ask(path: Path, text: str) -> None:
            n = len(driver.find_elements(By.CSS_SELECTOR, '#ask [aria-label="File thumbnail"]'))
            upload = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#ask input[type=file]"))[0]
            driver.execute_script("arguments[0].value = ''", upload)  # chromedriver adds to a multiple input
            upload.send_keys(str(path))
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, '#ask [aria-label="File thumbnail"]')) > n)
            box = driver.find_element(By.CSS_SELECTOR, "#ask textarea")
            box.send_keys(text)
            box.send_keys(Keys.ENTER)

        def last_bot() -> str:
            bots = driver.find_elements(By.CSS_SELECTOR, '#chat [data-testid="bot"]')
            return normal(bots[-1].text) if bots else ""

        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#chat [role=log]"))
        driver.execute_script(RECORD)
        ask(ASSET, QUESTION)
        wait.until(lambda d: last_bot() == cli)
        texts = [normal(t) for t in driver.execute_script("return window.__texts")]
        partial = [t for t in dict.fromkeys(texts) if t and t != cli]
        assert partial and all(cli.startswith(t) for t in partial), texts  # it grew, in more than one update

        ask(export["bad"], "And this one?")
        wait.until(lambda d: last_bot().startswith("Error: notes.jpg: not an image"))
        assert "[notes.jpg] And this one?" in driver.find_element(By.CSS_SELECTOR, "#chat").text
        assert "Traceback" not in driver.find_element(By.TAG_NAME, "body").text

        big = tmp_path / "big.jpg"  # over --max-upload-mb: the server refuses it before storing it
        big.write_bytes(bytes(2 * web_demo.MB))
        driver.find_element(By.CSS_SELECTOR, "#ask input[type=file]").send_keys(str(big))
        wait.until(lambda d: 'exceed the maximum allowed size of 1.0 Mb: "big.jpg"' in d.find_element(By.TAG_NAME,
                                                                                                     "body").text)
        driver.find_element(By.XPATH, "//button[normalize-space()='New chat']").click()
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, '#chat [data-testid="bot"]'))
        ask(ASSET, QUESTION)
        wait.until(lambda d: last_bot() == cli)
    finally:
        if browser is not None:
            browser.close()
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
