"""`make demo`, `demo-video` and `demo-speech` start each road afresh: the folders each one clears (the Makefile's
*_ROAD lists) cover every run directory and the data folder its checked-in configs write (a run left behind
would be resumed by the trainer, a data folder refused by make_synthetic)."""

import re
from pathlib import Path

import pytest
import yaml

from scripts import learning_image, learning_speech, learning_video

ROOT = Path(__file__).resolve().parents[2]


def make_list(name: str) -> set[str]:
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    [value] = re.findall(rf"^{name} :=(.*)$", text, flags=re.M)
    return set(value.split())


def run_dirs(configs) -> set[str]:
    return {yaml.safe_load(Path(c).read_text())["train"]["run_dir"] for c in configs}


@pytest.mark.parametrize("name, configs, data, baselines", [
    ("IMAGE_ROAD", learning_image.RUN_CONFIGS.values(), learning_image.DATA, [learning_image.FROZEN_LM_RUN]),
    ("VIDEO_ROAD", learning_video.RUN_CONFIGS.values(), learning_video.DATA, [learning_video.FROZEN_LM_RUN]),
    ("SPEECH_ROAD", [learning_speech.TEXT_CONFIG, learning_speech.SPEECH_CONFIG], Path("out/synthetic/spoken-digits"),
     []),
])
def test_each_demo_clears_every_folder_its_road_writes(name, configs, data, baselines):
    cleared = make_list(name)
    assert run_dirs(configs) | {str(data)} | {str(b) for b in baselines} <= cleared, cleared
