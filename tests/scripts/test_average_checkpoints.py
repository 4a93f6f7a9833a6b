"""average_checkpoints: the mean of a sweep's trainable weights, tensor by tensor; top-k by a metric file; the
result answers through demo_vqa; exports that do not share a base are refused, one line naming export and field."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters.checkpoint import save_meta_checkpoint
from adapters.model_io import load_checkpoint, save_checkpoint
from common.export import ExportFormatError
from scripts import average_checkpoints, demo_vqa
from training.averaging import (RECORD, AveragingError, ExportMismatchError, ScoreFileError, average_exports,
                                read_scores)
from tests.tiny import build_tiny_tokenizer, build_tiny_vqa_model, tiny_asr_config, tiny_video_config

ASSET = Path(__file__).resolve().parents[2] / "assets" / "coffee.jpg"


def trained(model, seed: int):
    """``model`` with every trainable tensor moved by its own noise: a sweep run on the same base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.trainable_named_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Three image exports trained on one frozen LM (lm/, not copied) and a fourth on another LM."""
    root = tmp_path_factory.mktemp("average")
    tok = build_tiny_tokenizer(root)
    lm = save_meta_checkpoint(build_tiny_vqa_model(tok, seed=0).lm, root / "lm")
    runs = {name: save_checkpoint(trained(build_tiny_vqa_model(tok, seed=0), seed), root / "sweep" / name,
                                  tokenizer_path=root / "tokenizer.model", lm_path=lm)
            for seed, name in enumerate(("a", "b", "c"), 1)}
    other = build_tiny_vqa_model(tok, seed=5)
    other_lm = save_meta_checkpoint(other.lm, root / "other_lm")
    runs["other_lm"] = save_checkpoint(trained(other, 9), root / "sweep" / "other_lm",
                                       tokenizer_path=root / "tokenizer.model", lm_path=other_lm)
    return {"root": root, "lm": lm, "tok": tok, **runs}


def weights(export: Path) -> dict[str, torch.Tensor]:
    return load_file(str(export / "model.safetensors"))


def mean(exports: list[Path]) -> dict[str, torch.Tensor]:
    """The hand-computed average: float32 sum over the exports in order, divided, cast back."""
    sds = [weights(e) for e in exports]
    return {k: (sum(sd[k].float() for sd in sds) / len(sds)).to(sds[0][k].dtype) for k in sds[0]}


def average(*argv) -> int:
    return average_checkpoints.main([str(a) for a in argv])


def test_uniform_average_is_the_mean_tensor_by_tensor(sweep, tmp_path, capsys):
    exports = [sweep["a"], sweep["b"], sweep["c"]]
    out = tmp_path / "avg"
    assert average(*exports, "--out", out) == 0
    assert capsys.readouterr().out == f"average_checkpoints: averaged 3 of 3 exports (uniform) into {out}\n"
    got, want = weights(out), mean(exports)
    assert sorted(got) == sorted(want) and not any(k.startswith("lm.") for k in got)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert not torch.equal(got["projector.weight"], weights(sweep["a"])["projector.weight"])
    meta, first = (json.loads((d / "config.json").read_text()) for d in (out, sweep["a"]))
    assert meta["format"] == first["format"] and meta["config"] == first["config"]
    assert meta["lm_fingerprint"] == first["lm_fingerprint"]
    assert meta["encoder_initialised_from"] == first["encoder_initialised_from"]
    assert meta["lm_path"] == str(sweep["lm"].resolve())
    assert meta["lm_path_relative"] == os.path.relpath(sweep["lm"].resolve(), out.resolve())
    assert (out / "tokenizer.model").read_bytes() == (sweep["a"] / "tokenizer.model").read_bytes()
    record = json.loads((out / RECORD).read_text())
    assert record["selection"] == {"method": "uniform"}
    assert record["averaged"] == [str(e.resolve()) for e in exports]
    assert [(r["score"], r["averaged"]) for r in record["exports"]] == [(None, True)] * 3
    assert sorted(p.name for p in out.iterdir()) == ["averaging.json", "config.json", "model.safetensors",
                                                     "tokenizer.model"]


def test_the_average_loads_and_answers_through_demo_vqa_batch_mode(sweep, tmp_path, capsys):
    out = tmp_path / "avg"
    assert average(sweep["a"], sweep["b"], "--out", out) == 0
    loaded = load_checkpoint(out)
    for k, v in weights(out).items():
        assert torch.equal(loaded.state_dict()[k], v), k
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"id": "q1", "image": str(ASSET), "question": "What colour are the shapes?",
                                     "kind": "colour"}) + "\n")
    preds = tmp_path / "predictions.jsonl"
    assert demo_vqa.main(["--questions", str(questions), "--out", str(preds), "--checkpoint", str(out),
                          "--max-new-tokens", "4"]) == 0
    [pred] = [json.loads(line) for line in preds.read_text().splitlines()]
    assert pred["id"] == "q1" and pred["answer"].strip()


@pytest.mark.parametrize("file_kind, lower, best", [("json", False, ("b", "c")), ("jsonl", True, ("a", "c"))])
def test_top_k_averages_the_best_by_the_metric(sweep, tmp_path, capsys, file_kind, lower, best):
    scores = {"a": 0.5, "b": 0.9, "c": 0.7}
    folder = sweep["root"] / "sweep"
    if file_kind == "json":  # paths relative to the file's folder
        metric = folder / "scores.json"
        metric.write_text(json.dumps({**scores, "not_given": 1.0}))
    else:  # absolute paths
        metric = tmp_path / "scores.jsonl"
        metric.write_text("".join(json.dumps({"export": str(folder / k), "score": v}) + "\n"
                                  for k, v in scores.items()))
    out = tmp_path / "avg"
    argv = [sweep["a"], sweep["b"], sweep["c"], "--out", out, "--metric", metric, "--top-k", 2]
    assert average(*argv, *(["--lower-is-better"] if lower else [])) == 0
    assert "averaged 2 of 3 exports (the top 2 by" in capsys.readouterr().out
    want = mean([sweep[k] for k in best])
    assert all(torch.equal(v, want[k]) for k, v in weights(out).items())
    record = json.loads((out / RECORD).read_text())
    assert record["selection"] == {"method": "top_k", "k": 2, "metric": str(metric.resolve()),
                                   "higher_is_better": not lower}
    assert [(r["score"], r["averaged"]) for r in record["exports"]] == [(v, k in best) for k, v in scores.items()]
    assert record["averaged"] == [str(sweep[k].resolve()) for k in best]  # best first


@pytest.fixture(scope="module")
def held(sweep):
    """Three bfloat16 exports that hold their frozen LM (the same one), and one holding another LM."""
    root = sweep["root"] / "held"
    make = lambda seed, lm_seed: trained(build_tiny_vqa_model(sweep["tok"], seed=lm_seed), seed).to(torch.bfloat16)
    return {name: save_checkpoint(make(seed, lm_seed), root / name, tokenizer_path=sweep["root"] / "tokenizer.model")
            for name, seed, lm_seed in (("a", 1, 0), ("b", 2, 0), ("c", 4, 0), ("other", 3, 5))}


def test_exports_holding_their_lm_copy_it_and_average_in_float32(held, tmp_path):
    out = tmp_path / "avg"
    assert average(held["a"], held["b"], held["c"], "--out", out) == 0
    got, a, b, c = weights(out), *(weights(held[k]) for k in "abc")
    lm_keys = [k for k in got if k.startswith("lm.")]
    assert lm_keys and all(torch.equal(got[k], a[k]) for k in lm_keys)
    trained_keys = sorted(set(got) - set(lm_keys))
    for k in trained_keys:  # bf16 -> float32 mean -> bf16
        want = ((a[k].float() + b[k].float() + c[k].float()) / 3).bfloat16()
        assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], want), k
    # a mean taken in bf16 rounds every partial sum: it differs somewhere, so the check above can tell them apart
    assert any(not torch.equal(got[k], (a[k] + b[k] + c[k]) / 3) for k in trained_keys)
    assert load_checkpoint(out).lm.tok_embeddings.weight.dtype == torch.bfloat16


def test_speech_exports_average_around_their_frozen_lm(sweep, tmp_path):
    from speech.adapter import build_speech_llama
    from speech.model_io import load_speech_checkpoint, save_speech_checkpoint

    cfg = tiny_asr_config(sweep["tok"])
    exports = []
    for seed in (1, 2):
        torch.manual_seed(0)
        model = trained(build_speech_llama(cfg), seed)
        exports.append(save_speech_checkpoint(model, tmp_path / f"s{seed}", sweep["root"] / "tokenizer.model"))
    out = tmp_path / "avg"
    assert average(*exports, "--out", out) == 0
    got, a, want = weights(out), weights(exports[0]), mean(exports)
    trainable = {n for n, _ in model.trainable_named_parameters()}
    for k in got:
        assert torch.equal(got[k], want[k] if k in trainable else a[k]), k
    assert any(k.startswith("lm.") for k in got) and trainable < set(got)
    model = load_speech_checkpoint(out)
    assert torch.equal(model.state_dict()["lm.tok_embeddings.weight"], a["lm.tok_embeddings.weight"])


def test_video_exports_average_the_video_adapter_and_keep_the_frozen_image_model(sweep, tmp_path, capsys):
    """The video stage trains the video adapter (and the new token rows) only: the image adapter and encoder
    are frozen, copied when equal and refused when not (another image model underneath)."""
    from adapters.multimodal import build_multimodal

    cfg = tiny_video_config(sweep["tok"], num_frames=4)
    trained_parts = {"video", "learnable_embedding"}

    def video_run(name: str, seed: int, image_seed: int = 0) -> Path:
        torch.manual_seed(image_seed)
        model = trained(build_multimodal(cfg), seed)
        assert {n.split(".")[0] for n, _ in model.trainable_named_parameters()} == trained_parts
        return save_checkpoint(model, tmp_path / name, tokenizer_path=sweep["root"] / "tokenizer.model")

    a, b, other = video_run("a", 1), video_run("b", 2), video_run("other", 3, image_seed=1)
    out = tmp_path / "avg"
    assert average(a, b, "--out", out) == 0
    got, first, want = weights(out), weights(a), mean([a, b])
    for k in got:
        assert torch.equal(got[k], want[k] if k.split(".")[0] in trained_parts else first[k]), k
    assert load_checkpoint(out).video is not None
    assert average(a, other, "--out", tmp_path / "refused") == 2
    assert capsys.readouterr().err.startswith(f"error: {other}: frozen tensor cross_attention_layers.0.")


# ---------------------------------------------------------------------------------------------- refusals


def edited(src: Path, dst: Path, meta=None, tensors=None, tokenizer: bytes | None = None) -> Path:
    """A copy of the export ``src`` with config.json (``meta``), the state dict (``tensors``) or the tokenizer
    changed in place."""
    shutil.copytree(src, dst)
    if meta is not None:
        data = json.loads((dst / "config.json").read_text())
        meta(data)
        (dst / "config.json").write_text(json.dumps(data))
    if tensors is not None:
        sd = weights(dst)
        tensors(sd)
        save_file(sd, str(dst / "model.safetensors"))
    if tokenizer is not None:
        (dst / "tokenizer.model").write_bytes(tokenizer)
    return dst


def speech_export(sweep, path: Path) -> Path:
    from speech.adapter import build_speech_llama
    from speech.model_io import save_speech_checkpoint

    return save_speech_checkpoint(build_speech_llama(tiny_asr_config(sweep["tok"])), path,
                                  sweep["root"] / "tokenizer.model")


GATE = "cross_attention_layers.0.gate_attn"


def refusal_case(case: str, sweep, held, tmp: Path) -> tuple[list[Path], Path | None, type, list[str]]:
    """(exports, metric file, error class, fragments of the one line) of each way to refuse."""
    a, b = sweep["a"], sweep["b"]
    if case == "lm_fingerprint":
        return [a, sweep["other_lm"]], None, ExportMismatchError, [f"{sweep['other_lm']}: lm_fingerprint is",
                                                                  "trained on another frozen LM"]
    if case == "shape":
        bad = edited(b, tmp / "b", tensors=lambda sd: sd.update({GATE: torch.zeros(2)}))
        return [a, bad], None, ExportMismatchError, [f"{bad}: tensor {GATE} has shape [2], {a} has [1]"]
    if case == "dtype":
        bad = edited(b, tmp / "b", tensors=lambda sd: sd.update({GATE: sd[GATE].double()}))
        return [a, bad], None, ExportMismatchError, [f"{bad}: tensor {GATE} has dtype F64, {a} has F32"]
    if case == "tensor_names":
        bad = edited(b, tmp / "b", tensors=lambda sd: sd.pop(GATE))
        return [a, bad], None, ExportMismatchError, [f"{bad}: tensor names: lacks ['{GATE}']"]
    if case == "kind":
        speech = speech_export(sweep, tmp / "speech")
        return [a, speech], None, ExportMismatchError, [f"{speech}: format is 'llama3-mm/speech/1', {a} has "
                                                        f"'llama3-mm/multimodal/1'"]
    if case == "config":
        bad = edited(b, tmp / "b", meta=lambda m: m["config"].update(train_image_token_rows=False))
        return [a, bad], None, ExportMismatchError, [f"{bad}: config.train_image_token_rows is False, {a} has True"]
    if case == "provenance":
        bad = edited(b, tmp / "b", meta=lambda m: m.update(encoder_initialised_from="clip/export/visual.pt"))
        return [a, bad], None, ExportMismatchError, [f"{bad}: encoder_initialised_from is 'clip/export/visual.pt'"]
    if case == "tokenizer":
        bad = edited(b, tmp / "b", tokenizer=b"another tokenizer")
        return [a, bad], None, ExportMismatchError, [f"{bad}: tokenizer.model is 'sha256 "]
    if case == "frozen_lm_tensor":
        return [held["a"], held["other"]], None, ExportMismatchError, [f"{held['other']}: frozen tensor lm.",
                                                                      "not the same base"]
    if case == "lm_layout":
        return [held["a"], a], None, ExportMismatchError, [f"{a}: lm_path is '{sweep['lm'].resolve()}', "
                                                           f"{held['a']} has None: one export holds its frozen LM"]
    if case == "twice":
        return [a, Path(f"{a}/../a")], None, AveragingError, [f"{a}/../a: given twice"]
    if case == "not_an_export":
        return [a, tmp], None, ExportFormatError, [f"{tmp}/config.json: not found"]
    metric = tmp / "scores.json"
    if case == "metric_missing_entry":
        metric.write_text(json.dumps({str(a): 0.5}))
        return [a, b], metric, ScoreFileError, [f"{metric}: no score for export {b}"]
    if case == "metric_not_a_number":
        metric.write_text(json.dumps({str(a): 0.5, str(b): "high"}))
        return [a, b], metric, ScoreFileError, [f"{metric} ('{b}'): the score of '{b}' must be a finite number"]
    metric = tmp / "scores.jsonl"
    if case == "metric_row_twice":
        metric.write_text("".join(json.dumps({"export": str(e), "score": 1}) + "\n" for e in (a, b, a)))
        return [a, b], metric, ScoreFileError, [f"{metric}:3: a second score for {a.resolve()} (first at {metric}:1)"]
    assert case == "metric_row_keys"
    metric.write_text(json.dumps({"export": str(a), "value": 1}) + "\n")
    return [a, b], metric, ScoreFileError, [f"{metric}:1: expected keys ['export', 'score'], got ['export', 'value']"]


CASES = ["lm_fingerprint", "shape", "dtype", "tensor_names", "kind", "config", "provenance", "tokenizer",
         "frozen_lm_tensor", "lm_layout", "twice", "not_an_export", "metric_missing_entry", "metric_not_a_number",
         "metric_row_twice", "metric_row_keys"]


@pytest.mark.parametrize("case", CASES)
def test_refusals_are_named_errors_and_one_line(sweep, held, tmp_path, capsys, case):
    exports, metric, error, fragments = refusal_case(case, sweep, held, tmp_path)
    out = tmp_path / "avg"
    with pytest.raises(error) as e:
        average_exports(exports, out, scores=read_scores(metric, exports) if metric else None)
    assert all(f in str(e.value) for f in fragments), str(e.value)
    argv = [*exports, "--out", out, *(["--metric", metric] if metric else [])]
    assert average(*argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == f"error: {e.value}\n" and "\n" not in str(e.value)
    assert not out.exists()  # every check runs before anything is written


def test_out_may_not_be_an_input(sweep, capsys):
    assert average(sweep["a"], sweep["b"], "--out", sweep["b"]) == 2
    assert capsys.readouterr().err == (f"error: out {sweep['b']} is one of the exports being averaged; "
                                       f"write the average elsewhere\n")


def test_an_unwritable_out_is_one_line(sweep, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert average(sweep["a"], sweep["b"], "--out", blocker / "avg") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {blocker / 'avg'}: cannot write the average (") and len(err.splitlines()) == 1


@pytest.mark.parametrize("argv, message", [
    (["a"], "give at least two exports to average"),
    (["a", "b", "--top-k", "1"], "--top-k needs --metric FILE (the scores that rank the exports)"),
    (["a", "b", "--metric", "s.json", "--top-k", "3"], "--top-k 3: only 2 exports given"),
    (["a", "b", "--metric", "s.json", "--top-k", "0"], "argument --top-k: must be >= 1, got 0"),
    (["a", "b", "--lower-is-better"], "--lower-is-better goes with --metric"),
])
def test_bad_arguments_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        average(*argv, "--out", "avg")
    assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].endswith(message)
