"""data_curation/qa_text.py and scripts.build_qa: question-answer conversation shards from captions and OCR text,
by templates (every answer follows from the text) or by a model (its output parsed, or the sample's error row),
with the generator recorded per sample and every input accounted for."""

import io
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image, ImageDraw

from adapters.chat import image_input_id
from data_curation.qa_text import (
    DESCRIBE,
    FIRST_WORD,
    READ_TEXT,
    TEMPLATES,
    QATextError,
    SourceText,
    nouns,
    parse_qa,
    qa_samples,
    template_qas,
)
from scripts import _rendered, build_qa
from scripts import build_shards as build_shards_cli
from tests.tiny import build_tiny_tokenizer, build_tiny_vqa_model, conversation_shards

CAPTIONS = {
    "ball": "A red ball on a wooden table",
    "dogs": "Two dogs playing in the park near a bench",
    "cup": "A cup of coffee beside an open laptop",
    "boat": "A small boat on the lake under the cliffs",
    "cat": "A cat sleeping on the sofa",
}
SIGN = {"caption": "A street sign on a pole", "ocr_text": "STOP HERE\nslowly"}
MENU = {"ocr_text": "OPEN 24 HOURS"}  # no caption: OCR text alone
N_INPUTS, N_OK = 10, 7  # 5 captions + sign + menu ok; nothing (json without either), empty caption, not UTF-8


def _png(i: int) -> bytes:
    img = Image.new("RGB", (96, 96), (40 * i % 256, 90, 200 - 20 * i))
    ImageDraw.Draw(img).ellipse((10 + 4 * i, 20, 60 + 4 * i, 70), fill=(250, 250 - 30 * i, 30))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def rows(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A sidecar folder (as build_shards reads it) with good and bad inputs, and a one-worker curation config."""
    root = tmp_path_factory.mktemp("qa")
    folder = root / "src"
    folder.mkdir()
    for i, (name, caption) in enumerate(CAPTIONS.items()):
        (folder / f"{name}.png").write_bytes(_png(i))
        (folder / f"{name}.txt").write_text(caption)
    for i, (name, side) in enumerate((("sign", SIGN), ("menu", MENU), ("nothing", {"tags": ["x"]})), 5):
        (folder / f"{name}.png").write_bytes(_png(i))
        (folder / f"{name}.json").write_text(json.dumps(side))
    (folder / "empty.png").write_bytes(_png(8))
    (folder / "empty.txt").write_text("  ")
    (folder / "latin.png").write_bytes(_png(9))
    (folder / "latin.txt").write_bytes(b"caf\xe9 au lait")
    cfg = yaml.safe_load(Path(_rendered.DEFAULT_CONFIG).read_text())
    (root / "cfg.yaml").write_text(yaml.safe_dump({**cfg, "workers": 1}))  # the shipped config, in-process
    return root, folder, str(root / "cfg.yaml")


def _args(inp, out, cfg, *extra) -> list[str]:
    return [str(inp), str(out), "--config", cfg, "--json", *extra]


@pytest.fixture(scope="module")
def built(src):
    root, folder, cfg = src
    assert build_qa.main(_args(folder, root / "out", cfg, "--per-sample", "5", "--seed", "3")) == 0
    return root / "out"


def _check_answers(meta: dict, caption: str, ocr: str, others: list[str]) -> None:
    """Every answer follows from the sample's own text: yes exactly for a noun of its caption."""
    turns = meta["conversations"]
    assert turns[0]["content"].startswith("<|image|>") and sum("<|image|>" in t["content"] for t in turns) == 1
    for q, a in zip(turns[::2], turns[1::2]):
        question, answer = q["content"].replace("<|image|>", ""), a["content"]
        if question == DESCRIBE:
            assert answer == caption
        elif question == READ_TEXT:
            assert answer == ocr
        elif question == FIRST_WORD:
            assert answer == ocr.split()[0]
        else:
            noun = re.fullmatch(r"Is there an? (\w+) in the image\?", question).group(1)
            assert answer == ("yes" if noun in nouns(caption) else "no"), (question, answer, caption)
            if answer == "yes":
                assert noun in caption.lower()  # the word itself (or its plural) is in the caption
            else:  # a noun of another caption
                assert noun not in caption.lower() and any(noun in c.lower() for c in others)


def test_templates_cli_writes_conversation_shards_whose_answers_follow_from_the_text(built, tmp_path):
    report = json.loads((built / "report.json").read_text())
    status = rows(built / "build_status.jsonl")
    assert len(status) == report["inputs"] == N_INPUTS and report["ok"] == N_OK
    assert report["ok"] + report["errors"] == report["inputs"]
    reasons = {r["key"]: r["reason"] for r in status if r["status"] == "error"}
    assert set(reasons) == {"nothing", "empty", "latin"}
    assert reasons["nothing"].startswith("no caption and no OCR text") and "missing caption" in reasons["nothing"]
    assert reasons["empty"] == "no caption and no OCR text" and "not valid UTF-8" in reasons["latin"]
    assert all(r["generator"] == TEMPLATES for r in status)
    s = report["shards"]
    assert s["inputs"] == N_OK and s["kept"] + s["dropped"] + s["error"] == N_OK and s["kept"] == N_OK
    assert report["pairs"] == sum(report["qa_kinds"].values()) and Image.open(built / "preview.png").format == "PNG"

    raws, metas, tok, codec = conversation_shards(built / "shards", tmp_path / "tok")
    assert len(raws) == N_OK
    texts = {**{k: (c, "") for k, c in CAPTIONS.items()}, "sign": (SIGN["caption"], SIGN["ocr_text"]),
             "menu": ("", MENU["ocr_text"])}
    captions = [c for c, _ in texts.values() if c]
    for raw, meta in zip(raws, metas):
        ex = codec.decode(raw)
        assert len(ex.media) == 1 and ex.tokens.count(image_input_id(tok)) == 1
        assert meta["generator"] == TEMPLATES and 1 <= len(meta["conversations"]) // 2 <= 5
        caption, ocr = texts[meta["source_key"]]
        _check_answers(meta, caption, ocr, [c for c in captions if c != caption])
    kinds = {k for m in metas for k in m["qa_kinds"]}
    assert kinds == {"describe", "ocr_text", "ocr_first_word", "noun_yes", "noun_no"}
    menu = next(m for m in metas if m["source_key"] == "menu")
    assert [t["content"] for t in menu["conversations"][1::2]] == ["OPEN 24 HOURS", "OPEN"]


def test_shards_of_build_shards_are_an_input_and_the_same_seed_gives_the_same_bytes(src, built, tmp_path, capsys):
    _, folder, cfg = src
    # image shards by scripts.build_shards: key.txt caption, the sidecar's ocr_text carried in key.json meta
    assert build_shards_cli.main([str(folder), str(tmp_path / "img"), "--config", cfg, "--json"]) == 0
    capsys.readouterr()
    assert build_qa.main(_args(tmp_path / "img", tmp_path / "from_shards", cfg, "--per-sample", "3")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["inputs"] == report["ok"] == 6  # build_shards kept the 5 captions and the sign
    _, metas, _, _ = conversation_shards(tmp_path / "from_shards" / "shards", tmp_path / "tok")
    sign = next(m for m in metas if "sign" in m["source_key"])
    assert [t["content"] for t in sign["conversations"][1::2]] == [SIGN["caption"], SIGN["ocr_text"], "STOP"]

    # the same arguments into another OUT: the same bytes; a rerun resumes; other arguments are refused
    again = tmp_path / "again"
    args = _args(folder, again, cfg, "--per-sample", "5", "--seed", "3")
    assert build_qa.main(args) == 0
    assert files(again / "raw") == files(built / "raw")  # (the shards hold OUT's path as each sample's source)
    assert (again / "build_status.jsonl").read_bytes() == (built / "build_status.jsonl").read_bytes()
    capsys.readouterr()
    assert build_qa.main(args) == 0
    assert json.loads(capsys.readouterr().out)["shards"]["kept"] == N_OK
    assert build_qa.main([*args, "--seed", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("build_qa:") and "other arguments" in err and "\n" not in err


def test_nouns_and_templates():
    assert nouns("Two dogs playing in the park, the Berries and a bench slowly") == ["dog", "park", "berry", "bench"]
    assert nouns("a red big old one") == []
    text = SourceText("k", "s", b"", ".png", "A cat on a mat", "")
    vocab = sorted({"cat", "mat", "dog", "tree", "apple"})
    for seed in range(4):
        qas = template_qas(text, vocab, 5, seed)
        assert qas[0].question == DESCRIBE and qas == template_qas(text, vocab, 5, seed)
        yes = {q.question for q in qas if q.answer == "yes"}
        assert yes == {"Is there a cat in the image?", "Is there a mat in the image?"}
        no = [q.question for q in qas if q.answer == "no"]
        assert len(no) == 2 and set(no) <= {"Is there a dog in the image?", "Is there a tree in the image?",
                                             "Is there an apple in the image?"}
    assert len({tuple(template_qas(text, vocab, 5, s)) for s in range(8)}) > 1  # the seed picks
    assert [q.kind for q in template_qas(text, vocab, 1, 0)] == ["describe"]


def test_parse_qa_on_given_strings():
    pairs = parse_qa("Sure!\nQ: What is on the table?\nA: A red ball.\nQ: Is it round A: yes\n", 5)
    assert [(p.question, p.answer, p.kind) for p in pairs] == [("What is on the table?", "A red ball.", "llm"),
                                                                ("Is it round?", "yes", "llm")]
    assert len(parse_qa("Q: a? A: b Q: c? A: d Q: e? A: f", 2)) == 2
    assert parse_qa("FAQ: no. Q: Who? A: Bo", 3)[0].question == "Who?"
    for bad, words in (("", "wrote nothing"), ("the image shows a ball", "no 'Q: ... A: ...' pair"),
                       ("Q: what is it?", "no 'Q: ... A: ...' pair"), ("Q: x? A: " + "y" * 2001, "runaway")):
        with pytest.raises(QATextError, match=words):
            parse_qa(bad, 3)


def test_a_model_generator_records_its_path_and_unparseable_output_is_an_error_row(src, tmp_path, monkeypatch,
                                                                                    capsys):
    _, folder, cfg = src
    answers = iter(["Q: What colour is the ball? A: red", "nothing useful"] * 10)
    seen = []

    def complete(messages):
        seen.append(messages)
        return next(answers)

    out = list(qa_samples(folder, "some/model", 2, 0, complete))
    assert len(out) == N_INPUTS and len(seen) == N_OK  # the model is asked only about inputs with text
    assert seen[0][0]["role"] == "system" and "Caption: A red ball" in seen[0][1]["content"]
    ok = [s for r, s in out if r["status"] == "ok"]
    bad = [r for r, _ in out if r["status"] == "error" and "Q: ... A:" in r["reason"]]
    assert len(ok) == 4 and len(bad) == 3 and all(r["generator"] == "some/model" for r, _ in out)
    assert ok[0].sidecar()["conversations"] == [{"role": "user", "content": "<|image|>What colour is the ball?"},
                                                {"role": "assistant", "content": "red"}]
    assert ok[0].sidecar()["generator"] == "some/model" and ok[0].sidecar()["qa_kinds"] == ["llm"]

    # through the CLI: the model's pairs land in the shards with its path as meta.generator
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    answers = iter(["Q: What is shown? A: a picture", "Q: nothing else"] * 10)
    monkeypatch.setattr(build_qa, "load_generator", lambda path, n: lambda messages: next(answers))
    assert build_qa.main(_args(folder, tmp_path / "out", cfg, "--generator", str(model_dir))) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] == 4 and report["errors"] == 6 and report["shards"]["kept"] == 4
    assert report["error_reasons"]["no 'Q: ... A: ...' pair in the model's output ('Q: nothing else')"] == 3
    _, metas, _, _ = conversation_shards(tmp_path / "out" / "shards", tmp_path / "tok")
    assert [m["generator"] for m in metas] == [str(model_dir)] * 4
    assert {m["conversations"][1]["content"] for m in metas} == {"a picture"}


def test_a_tiny_export_and_llama_dir_run_end_to_end(src, tmp_path, capsys):
    from adapters.checkpoint import save_meta_checkpoint
    from adapters.model_io import save_checkpoint

    _, folder, cfg = src
    prompt_words = ["You write question-answer pairs about an image from its description. Answer each question",
                    "Caption: Text in the image: Write question-answer pairs, one per line, as: Q: A:",
                    *CAPTIONS.values(), SIGN["caption"], SIGN["ocr_text"], MENU["ocr_text"]]
    tok = build_tiny_tokenizer(tmp_path / "tok", n_merges=200, texts=prompt_words)
    model = build_tiny_vqa_model(tok, seed=1)
    export = save_checkpoint(model, tmp_path / "export", tokenizer_path=tok.path)
    args = _args(folder, tmp_path / "out", cfg, "--generator", str(export), "--max-new-tokens", "16")
    assert build_qa.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    status = rows(tmp_path / "out" / "build_status.jsonl")
    assert report["inputs"] == len(status) == N_INPUTS and report["ok"] + report["errors"] == N_INPUTS
    assert report["errors"] >= 3 and all(r["generator"] == str(export) for r in status)
    s = report["shards"]
    assert s["inputs"] == report["ok"] and s["kept"] + s["dropped"] + s["error"] == report["ok"]
    if report["ok"]:  # random weights seldom write a pair; when they do, the shard says who wrote it
        _, metas, _, _ = conversation_shards(tmp_path / "out" / "shards", tmp_path / "tok2")
        assert all(m["generator"] == str(export) for m in metas)

    llama = save_meta_checkpoint(model.lm, tmp_path / "llama")
    shutil.copy(tok.path, llama / "tokenizer.model")
    complete = build_qa.load_generator(llama, 8)
    text = complete([{"role": "user", "content": "Caption: A cat on a mat"}])
    assert isinstance(text, str) and text == build_qa.load_generator(export, 8)(
        [{"role": "user", "content": "Caption: A cat on a mat"}])  # the export's text-only road is its LM


def test_help_and_bad_arguments(src, tmp_path, capsys):
    _, folder, _ = src
    with pytest.raises(SystemExit) as e:
        build_qa.main(["--help"])
    assert e.value.code == 0 and "build_qa SHARDS_OR_FOLDER OUT" in capsys.readouterr().out
    for bad, words in ((["--per-sample", "0"], "--per-sample"), (["--seed", "-1"], "--seed"),
                       (["--max-new-tokens", "x"], "--max-new-tokens")):
        with pytest.raises(SystemExit) as e:
            build_qa.main([str(folder), str(tmp_path / "o"), *bad])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("build_qa:") and words in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        build_qa.main([str(folder)])
    assert e.value.code == 2 and "required" in capsys.readouterr().err
    for argv, words in (([str(tmp_path / "missing"), str(tmp_path / "o")], "not found"),
                        ([str(folder), str(tmp_path / "o"), "--generator", str(tmp_path / "nomodel")],
                         "neither 'templates' nor a model"),
                        ([str(folder), str(tmp_path / "o"), "--generator", str(folder)], "cannot load --generator")):
        assert build_qa.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("build_qa:") and words in err and err.count("\n") == 1
