"""synthetic/charts.py draws charts, tables and equations whose targets and answers follow from their data (the
bars' pixel heights checked against the values), the same seed gives the same bytes, and scripts.build_charts
turns them into conversation shards the trainer's codec decodes, with every sample accounted for."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from adapters.chat import IGNORE_INDEX, image_input_id
from scripts import _rendered, build_charts
from synthetic.charts import (
    COLOURS,
    KINDS,
    PROMPTS,
    ChartError,
    check_latex,
    parse_markdown_table,
    render_chart,
    write_chart_questions,
)
from tests.tiny import conversation_shards


def rows(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_and_sample_i_whatever_n(tmp_path):
    for kind in KINDS:
        a, b = render_chart(kind, 5, 3), render_chart(kind, 5, 3)
        assert a.png == b.png and a.target == b.target and a.qas == b.qas, kind
        assert render_chart(kind, 6, 3).png != a.png, kind  # another seed, another sample
    write_chart_questions(tmp_path / "a", 4, seed=1)
    write_chart_questions(tmp_path / "b", 4, seed=1)
    assert files(tmp_path / "a") == files(tmp_path / "b")
    few = build_charts.render_raw(tmp_path / "few", 3, 2, KINDS, None)
    many = build_charts.render_raw(tmp_path / "many", 7, 2, KINDS, None)
    assert many[:3] == few and files(tmp_path / "few") == {k: v for k, v in files(tmp_path / "many").items()
                                                            if k < "raw/000003"}
    # the held-out stream is not the builder's: held-out chart 0 is not training sample 0
    assert (tmp_path / "a" / "images" / "00000.png").read_bytes() != render_chart("bar", 1, 0).png


def _bar_heights(png: bytes, colour: str) -> list[int]:
    """Pixel heights of the bars drawn in ``colour``, left to right (columns of that exact colour, in runs)."""
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    want = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
    mask = (np.abs(rgb - want).sum(-1) <= 3)
    cols = mask.sum(0)
    heights, run = [], []
    for c in [*cols, 0]:
        if c:
            run.append(c)
        elif run:
            heights.append(int(np.median(run)))
            run = []
    return heights


def test_targets_and_answers_follow_from_the_data():
    for i in range(6):
        bar = render_chart("bar", 0, i)
        labels, values = bar.data["labels"], bar.data["values"]
        header, body = parse_markdown_table(bar.target)
        assert header == ["label", "value"] and body == [[lab, str(v)] for lab, v in zip(labels, values)]
        value, compare, extrema = bar.qas
        asked = value.question.removeprefix("What is the value of ").removesuffix("?")
        assert value.answer == str(dict(zip(labels, values))[asked])
        a, b = compare.question.removeprefix("Is ").removesuffix("?").split(" larger than ")
        assert compare.answer == ("yes" if values[labels.index(a)] > values[labels.index(b)] else "no")
        pick = max if "tallest" in extrema.question else min
        assert extrema.answer == labels[values.index(pick(values))]
        # parity with the picture: each bar's pixel height is its value times one scale
        colour = next(c for c in COLOURS if _bar_heights(bar.png, c))
        heights = _bar_heights(bar.png, colour)
        assert len(heights) == len(values)
        scale = heights[0] / values[0]
        assert all(abs(h - v * scale) <= 2 for h, v in zip(heights, values)), (heights, values)
    for i in range(3):
        line = render_chart("line", 1, i)
        assert parse_markdown_table(line.target)[1] == [[lab, str(v)] for lab, v in
                                                        zip(line.data["labels"], line.data["values"])]
        pie = render_chart("pie", 1, i)
        _, body = parse_markdown_table(pie.target)
        assert sum(int(s.removesuffix("%")) for _, s in body) == 100 and len({s for _, s in body}) == len(body)
        table = render_chart("table", 1, i)
        header, body = parse_markdown_table(table.target)
        assert header == table.data["header"] and body == [[str(c) for c in r] for r in table.data["rows"]]
        for qa in table.qas:
            col, row = qa.question.removeprefix("What is the value of ").removesuffix("?").split(" in row ")
            assert qa.answer == body[[r[0] for r in body].index(row)][header.index(col)]
        eq = render_chart("equation", 1, i)
        (symbol,) = eq.qas
        assert eq.target == eq.data["latex"] and f"\\{symbol.answer}" in eq.target
        check_latex(eq.target)  # the target itself parses
    turns = render_chart("table", 0, 0).conversation()
    assert turns[0] == {"role": "user", "content": "<|image|>" + PROMPTS["table"]}
    assert [t["role"] for t in turns] == ["user", "assistant"] * 3


def test_bad_latex_is_a_chart_error_with_the_parsers_reason():
    with pytest.raises(ChartError, match=r"mathtext cannot parse '\\frac\{1\}\{': .*Expected"):
        render_chart("equation", 0, 0, latex=r"\frac{1}{")
    with pytest.raises(ChartError, match="Unknown symbol"):
        check_latex(r"\nosuchmacro x")
    assert render_chart("equation", 0, 0, latex=r"\sqrt{x}").qas == ()  # a user's equation: no templated question


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """build_charts end to end: 10 samples of every kind, one equation line mathtext cannot parse."""
    tmp = tmp_path_factory.mktemp("charts")
    cfg = yaml.safe_load(Path(_rendered.DEFAULT_CONFIG).read_text())
    (tmp / "cfg.yaml").write_text(yaml.safe_dump({**cfg, "workers": 1}))  # the shipped config, in-process
    (tmp / "eq.txt").write_text("$\\frac{a}{b}$\n\n\\frac{1}{\n")
    args = [str(tmp / "out"), "--n", "10", "--seed", "4", "--equations", str(tmp / "eq.txt"),
            "--config", str(tmp / "cfg.yaml"), "--json"]
    assert build_charts.main(args) == 0
    return tmp, args


def test_the_cli_writes_shards_the_conversation_codec_decodes(built, tmp_path, capsys):
    tmp, args = built
    out = tmp / "out"
    report = json.loads((out / "report.json").read_text())
    status = rows(out / "build_status.jsonl")
    assert [r["id"] for r in status] == [f"{i:06d}" for i in range(10)]
    (bad,) = [r for r in status if r["status"] == "error"]
    assert bad["id"] == "000009" and bad["kind"] == "equation" and "cannot parse" in bad["reason"]
    assert report["rendered"] == 9 and report["errors"] == 1 and report["rendered"] + report["errors"] == 10
    s = report["shards"]
    assert s["inputs"] == 9 and s["kept"] + s["dropped"] + s["error"] == 9 and s["kept"] == 9
    assert json.loads((out / "shards" / "report.json").read_text())["counts"]["kept"] == s["kept"]
    assert report["by_kind"]["equation"] == {"ok": 1, "error": 1}
    assert Image.open(out / "preview.png").format == "PNG"

    raws, metas, tok, codec = conversation_shards(out / "shards", tmp_path / "tok")
    assert len(raws) == 9
    for raw, meta in zip(raws, metas):
        ex = codec.decode(raw)
        assert len(ex.media) == 1 and ex.tokens.count(image_input_id(tok)) == 1
        target = meta["conversations"][1]["content"]
        labelled = [t for t, lab in zip(ex.tokens, ex.labels) if lab != IGNORE_INDEX]
        assert labelled[: len(tok.encode(target))] == tok.encode(target)  # the first answer is the target
    assert {m["kind"] for m in metas} == set(KINDS)
    assert next(m for m in metas if m["kind"] == "equation")["conversations"][1]["content"] == r"\frac{a}{b}"

    # a rerun with the same arguments resumes; other arguments over the same OUT are one line and exit 2
    assert build_charts.main(args) == 0
    assert json.loads(capsys.readouterr().out)["shards"] == report["shards"]
    assert build_charts.main([*args, "--seed", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("build_charts:") and "other arguments" in err and "\n" not in err


def test_held_out_questions_are_what_demo_vqa_reads(tmp_path):
    from scripts._batch import read_questions

    made = write_chart_questions(tmp_path, 3, seed=0)
    questions, answers = rows(made["questions"]), rows(made["answers"])
    assert len(questions) == len(answers) == made["n_questions"] == 9  # value, compare, extrema per bar chart
    assert [q["id"] for q in questions] == [a["id"] for a in answers]
    assert {a["kind"] for a in answers} == {"value", "compare", "extrema"}
    assert len(read_questions(made["questions"], "image")) == 9


def test_help_and_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        build_charts.main(["--help"])
    assert e.value.code == 0 and "build_charts OUT" in capsys.readouterr().out
    for bad, words in ((["--n", "0"], "--n"), (["--kinds", "bar,pies"], "unknown kind 'pies'"),
                       (["--seed", "-1"], "--seed"), ([], "required")):
        with pytest.raises(SystemExit) as e:
            build_charts.main([str(tmp_path / "o")] * bool(bad) + bad)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("build_charts:") and words in err and err.count("\n") == 1
    assert build_charts.main([str(tmp_path / "o"), "--equations", str(tmp_path / "missing.txt")]) == 2
    err = capsys.readouterr().err
    assert "cannot read --equations" in err and err.count("\n") == 1 and not (tmp_path / "o").exists()
