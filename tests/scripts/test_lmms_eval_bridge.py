"""scripts.lmms_eval_model: lmms-eval 0.7.3's own CLI, on a local task (tests/scripts/lmms_tasks), finds our model
through the entry point, answers as scripts.evaluate does and scores choices with the continuation's log-likelihood;
the video, stop-string and multi-round paths are driven in-process with lmms-eval's request objects."""

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from lmms_eval.api.instance import GenerationResult, Instance
from PIL import Image

from adapters.chat import Message, encode_dialog
from adapters.model_io import load_checkpoint, save_checkpoint
from adapters.multimodal import ImageBatch
from adapters.tokenizer import Tokenizer
from media.image import load_image
from scripts import evaluate, lmms_eval_model
from scripts.lmms_eval_model import Llama3MM, cut_at_stops, sampling_config
from tests.scripts.test_demo_video import assets  # noqa: F401 (fixtures)
from tests.scripts.test_demo_vqa import read_jsonl, write_jsonl
from tests.scripts.test_evaluate import image_task, open_gates  # noqa: F401
from vision.tiling import TilingConfig, collate_tiled, tile_image

TASKS = Path(__file__).resolve().parent / "lmms_tasks"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1"}


def predictions(ckpt: Path, task: str, rows: list[dict], folder: Path, *extra: str) -> dict[str, str]:
    """scripts.evaluate's batched answers to ``rows`` (4 new tokens, batches of 2)."""
    data = write_jsonl(folder / f"{task}_rows.jsonl", rows)
    out = folder / f"{task}_out"
    assert evaluate.main(["--checkpoint", str(ckpt), "--task", task, "--data", str(data), "--out", str(out),
                          "--max-new-tokens", "4", "--batch-size", "2", *extra]) == 0
    return {p["id"]: p["answer"] for p in read_jsonl(out / "predictions.jsonl")}


def requests(model: Llama3MM, kind: str, docs: list[dict], args: list[tuple]) -> list[Instance]:
    """lmms-eval Instances of ``kind`` over ``docs`` (a one-split task "t"), as its tasks build them."""
    model.task_dict = {"t": {"test": docs}}
    return [Instance(kind, (*a, i, "t", "test"), 0, {"task": "t", "doc_id": i, "repeats": 1})
            for i, a in enumerate(args)]


@pytest.fixture(scope="module")
def image_export(image_task, tmp_path_factory):  # noqa: F811
    """test_evaluate's tiny image export (images of 1 and several tiles, two question lengths), its rows with
    absolute image paths, scripts.evaluate's answers, and a folder for the lmms-eval task file."""
    folder = image_task["data"].parent
    rows = [{"id": r["id"], "image": str(folder / r["image"]), "question": r["question"]} for r in image_task["rows"]]
    data = tmp_path_factory.mktemp("lmms_data")
    answers = predictions(image_task["ckpt"], "docvqa", [{**r, "answers": ["x"]} for r in rows], data)
    assert answers == image_task["answers"]  # evaluate's batches answer as the demo
    return {"ckpt": image_task["ckpt"], "data": data, "rows": rows, "answers": answers,
            "tok": Tokenizer(image_task["root"] / "tokenizer.model"), "model": load_checkpoint(image_task["ckpt"]).eval()}


def direct_logprobs(model, tok: Tokenizer, row: dict, continuation: str) -> tuple[list[int], torch.Tensor]:
    """(the continuation's ids, log-probs (len + 1, vocab) of the positions that predict them and the next token),
    from one forward pass of the loaded export over prompt + continuation."""
    vcfg = model.cfg.vision
    tiled = tile_image(load_image(row["image"]), TilingConfig(tile_size=vcfg.tile_size, max_tiles=vcfg.max_tiles))
    images = ImageBatch.from_collated(collate_tiled([[tiled]])).trimmed()
    prompt = encode_dialog(tok, [Message("user", row["question"], n_images=1)])
    cont = tok.encode(continuation)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + cont]), images)[0].float(), -1)
    return cont, logp[len(prompt) - 1 :]


def direct_nll(model, tok: Tokenizer, row: dict, continuation: str) -> tuple[float, bool]:
    """-log p(continuation | prompt, image) and whether greedy decoding gives it."""
    cont, logp = direct_logprobs(model, tok, row, continuation)
    steps = logp[:-1]
    picked = steps[torch.arange(len(cont)), torch.tensor(cont)]
    return -float(picked.sum()), bool((steps.argmax(-1) == torch.tensor(cont)).all())


def likeliest_token(model, tok: Tokenizer, row: dict) -> str:
    """The text of the likeliest first answer token that encodes back to itself (the untrained model's own pick
    may be a special token, which text cannot ask for): greedy decoding's first token when that is a plain one."""
    _, logp = direct_logprobs(model, tok, row, "")
    for t in logp[0].argsort(descending=True).tolist():
        if tok.encode(text := tok.decode([t])) == [t]:
            return text
    raise AssertionError("no token encodes back to itself")


def test_the_entry_point_names_the_model():
    (ep,) = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "llama3_mm"]
    assert ep.value == "scripts.lmms_eval_model:manifest"
    from lmms_eval.models import get_model

    assert get_model("llama3_mm") is Llama3MM


def test_lmms_eval_cli_answers_as_evaluate_and_scores_choices_by_likelihood(image_export, tmp_path):
    ex = image_export
    other = {"a": "blue", "b": "3", "c": "red", "d": "two", "e": ex["answers"]["a"]}
    # choice 0: the likeliest plain first token (greedy's own pick on some rows: is_greedy True there)
    docs = [{**r, "answer": ex["answers"][r["id"]], "choices": [likeliest_token(ex["model"], ex["tok"], r),
                                                                 other[r["id"]]], "label": 0} for r in ex["rows"]]
    write_jsonl(ex["data"] / "task.jsonl", docs)
    out = tmp_path / "results"
    # Without the launcher variables an earlier in-process training run left behind (training.trainer sets RANK,
    # WORLD_SIZE, MASTER_ADDR / MASTER_PORT for its one-rank group): lmms-eval's Accelerator would try to join it.
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {**{k: v for k, v in os.environ.items() if k not in launcher}, **OFFLINE, "HF_HOME": str(tmp_path / "hf")}
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "llama3_mm",
           "--model_args", f"checkpoint={ex['ckpt']},device=cpu", "--tasks", "tiny_vqa,tiny_vqa_mc",
           "--include_path", str(TASKS), "--batch_size", "3", "--output_path", str(out), "--log_samples"]
    done = subprocess.run(cmd, cwd=ex["data"], env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (results,) = out.glob("*_results.json")
    scores = json.loads(results.read_text())["results"]

    generated = [json.loads(line) for line in next(out.glob("*_samples_tiny_vqa.jsonl")).read_text().splitlines()]
    assert [s["doc_id"] for s in generated] == [0, 1, 2, 3, 4]
    assert [s["filtered_resps"] for s in generated] == [ex["answers"][r["id"]] for r in ex["rows"]]
    assert scores["tiny_vqa"]["exact_match,none"] == 1.0  # the task's answers are evaluate's

    chosen = [json.loads(line) for line in next(out.glob("*_samples_tiny_vqa_mc.jsonl")).read_text().splitlines()]
    expected_acc, greedy_rows = [], 0
    for sample, doc in zip(chosen, docs):
        direct = [direct_nll(ex["model"], ex["tok"], doc, c) for c in doc["choices"]]
        got = [(float(nll), greedy == "True") for nll, greedy in sample["filtered_resps"]]  # logged as strings
        assert [g for _, g in got] == [g for _, g in direct]
        greedy_rows += direct[0][1]
        assert [n for n, _ in got] == pytest.approx([n for n, _ in direct], rel=1e-5, abs=1e-5)
        expected_acc.append(float(min(range(2), key=lambda i: direct[i][0]) == 0))  # the smallest NLL is picked
        assert sample["acc"] == expected_acc[-1]
    assert scores["tiny_vqa_mc"]["acc,none"] == pytest.approx(sum(expected_acc) / 5)
    assert greedy_rows > 0 and 0 < sum(expected_acc)  # is_greedy and the choice were both exercised


def test_stop_strings_sampling_settings_and_batches(image_export):
    ex = image_export
    model = Llama3MM(checkpoint=str(ex["ckpt"]), device="cpu", batch_size=2)
    docs = [{"image": r["image"]} for r in ex["rows"]]
    visual = lambda doc: [Image.open(doc["image"]).convert("RGB")]
    a = ex["answers"]["a"]
    assert len(a) >= 3
    stop = a[1:3]  # a stop string inside the first answer: it is cut there
    kwargs = [{"max_new_tokens": 4, "until": [stop] if r["id"] == "a" else "\n\n", "do_sample": False,
               "temperature": 0.7 if r["id"] == "b" else 0} for r in ex["rows"]]  # do_sample False: greedy anyway
    reqs = requests(model, "generate_until", docs, [(r["question"], k, visual) for r, k in zip(ex["rows"], kwargs)])
    got = model.generate_until(reqs)
    assert got == [cut_at_stops(ex["answers"][r["id"]], k["until"] if isinstance(k["until"], list) else [k["until"]])
                   for r, k in zip(ex["rows"], kwargs)]
    assert got[0] == a[: a.index(stop)] and got[1:] == [ex["answers"][r["id"]] for r in ex["rows"][1:]]
    sampling, until = sampling_config({"max_new_tokens": 7, "temperature": 0.5, "top_p": 0.9, "until": "Q:"})
    assert (sampling.max_new_tokens, sampling.temperature, sampling.top_p, until) == (7, 0.5, 0.9, ["Q:"])
    with pytest.raises(ValueError, match="num_beams"):
        sampling_config({"num_beams": 4})
    too_long = requests(model, "generate_until", docs[:1], [("q", {"max_new_tokens": 10_000}, visual)])
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate_until(too_long)


def test_multi_round_asks_each_round_as_a_single_turn(image_export):
    ex = image_export
    model = Llama3MM(checkpoint=str(ex["ckpt"]), device="cpu")
    rows = {r["id"]: r for r in ex["rows"]}
    seen = []

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        seen.append((round_idx, list(previous_output), previous_round_info))
        terminal = round_idx == 2
        return [Image.open(rows["c"]["image"]).convert("RGB")], rows["c"]["question"], terminal, previous_output, "i"

    visual = lambda doc: [Image.open(rows["a"]["image"]).convert("RGB")]
    reqs = requests(model, "generate_until_multi_round", [{}], [(rows["a"]["question"], {"max_new_tokens": 4},
                                                                 visual, doc_to_text)])
    assert model.generate_until_multi_round(reqs) == [[ex["answers"]["a"], ex["answers"]["c"]]]
    assert seen == [(1, [ex["answers"]["a"]], None), (2, [ex["answers"]["a"], ex["answers"]["c"]], "i")]


def test_video_requests_answer_as_evaluate_video_mc(assets, tmp_path):  # noqa: F811
    from synthetic.motion import QUESTION, make_motion_clips

    video_model = load_checkpoint(assets["video"])  # test_demo_video's tiny video export, its gates opened
    open_gates(video_model)
    ckpt = save_checkpoint(video_model, tmp_path / "ckpt", tokenizer_path=assets["root"] / "tokenizer.model")
    options = ["left", "right", "up", "down"]
    rows = []
    for i, clip in enumerate(make_motion_clips(3, seed=0, max_frames=9)):
        (tmp_path / f"clip{i}.mp4").write_bytes(clip.video)
        rows.append({"id": f"v{i}", "video": str(tmp_path / f"clip{i}.mp4"), "question": QUESTION,
                     "options": options, "answers": ["A"]})
    answers = predictions(ckpt, "video_mc", rows, tmp_path)
    model = Llama3MM(checkpoint=str(ckpt), device="cpu", batch_size=2)  # frames: the export's max_frames
    prompt = evaluate.mc_prompt(QUESTION, tuple(options))
    reqs = requests(model, "generate_until", rows, [(prompt, {"max_new_tokens": 4}, lambda doc: [doc["video"]])] * 3)
    assert model.generate_until(reqs) == [answers[r["id"]] for r in rows]


def test_bad_model_args_are_refused(image_export):
    with pytest.raises(ValueError, match="exactly one of checkpoint"):
        Llama3MM()
    with pytest.raises(ValueError, match=r"unknown model_args \['pretrained'\]"):
        Llama3MM(checkpoint=str(image_export["ckpt"]), pretrained="x")
    assert isinstance(lmms_eval_model.manifest().simple_class_path, str)
    model = Llama3MM(checkpoint=str(image_export["ckpt"]), device="cpu")
    reqs = requests(model, "loglikelihood", [{}], [("q", "", lambda doc: [])])
    with pytest.raises(ValueError, match="empty continuation"):
        model.loglikelihood(reqs)
    (ok,) = model.loglikelihood(requests(model, "loglikelihood", [{}], [("q", "yes", lambda doc: [])]))
    assert isinstance(ok, GenerationResult) and ok.text[0] > 0  # a negative log-likelihood
