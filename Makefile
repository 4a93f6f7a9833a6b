# `make demo` and `make test` work on a fresh clone: they create .venv if missing and install the project.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-video demo-speech web-demo test install clean system-deps

# Debian programs the tests and demos run: Tesseract (OCR filter), espeak-ng (synthetic speech), ffmpeg and
# ffprobe (test clips, bench_video), chromium and chromedriver (the web demo's browser test). Installed when
# running as root, else checked; tests/system_deps.py names the same programs, and a test whose program is
# missing fails with the install command.
SYSTEM_PACKAGES := tesseract-ocr tesseract-ocr-eng espeak-ng ffmpeg chromium chromium-driver
SYSTEM_PROGRAMS := tesseract espeak-ng ffmpeg ffprobe chromium chromedriver

system-deps:
	@missing=""; for p in $(SYSTEM_PROGRAMS); do command -v $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if command -v tesseract >/dev/null 2>&1 && ! tesseract --list-langs 2>/dev/null | grep -qx eng; then \
		missing="$$missing tesseract-eng"; fi; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then \
			echo "installing Debian packages for:$$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
				$(SYSTEM_PACKAGES) >/dev/null; \
		else echo "missing:$$missing; install them with: apt-get install $(SYSTEM_PACKAGES)"; exit 1; fi; \
	fi

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The image road end to end (raw files -> shards -> trainer -> export -> answers), written where the
# configs/run_*_synthetic.yaml paths point (out/synthetic/image-vqa, runs/synthetic/*): a fresh run each time.
IMAGE_ROAD := out/synthetic/image-vqa runs/synthetic/text runs/synthetic/clip runs/synthetic/image_qa \
	runs/synthetic/image_frozen_lm

demo: $(STAMP) system-deps
	$(PY) -m scripts.inspect_image assets/coffee.jpg --preset tiny --out runs/demo/coffee_tiles.png
	rm -rf $(IMAGE_ROAD)
	$(PY) -m scripts.bench_learning image --work-dir .

# The video road end to end (H.264 clips -> video shards + still shards -> text LM -> encoder -> image adapter
# -> video adapter -> export -> answers), where configs/run_*_video_synthetic.yaml, run_image_frames_synthetic.yaml
# and run_video_qa_synthetic.yaml point: a fresh run each time. Then one held-out clip again.
VIDEO_ROAD := out/synthetic/video-motion runs/synthetic/video_text runs/synthetic/video_clip \
	runs/synthetic/video_image runs/synthetic/video_image_only runs/synthetic/video_qa runs/synthetic/video_frozen_lm

demo-video: $(STAMP) system-deps
	rm -rf $(VIDEO_ROAD)
	$(PY) -m scripts.bench_learning video --work-dir .
	$(PY) -m scripts.demo_video --checkpoint runs/synthetic/video_qa/export --frames 8 \
		--video out/synthetic/video-motion/test/00000.mp4 --question "Which way does the ball move?"
	head -n 1 out/synthetic/video-motion/test/answers.jsonl

# The speech road end to end (espeak-ng clips -> audio shards -> text LM -> speech adapter -> export ->
# transcripts -> WER), where configs/run_text_speech_synthetic.yaml and run_speech_synthetic.yaml point: a
# fresh run each time. It prints a few held-out transcripts, right or wrong, and the WER; then one clip again.
SPEECH_ROAD := out/synthetic/spoken-digits runs/synthetic/text_speech runs/synthetic/speech

demo-speech: $(STAMP) system-deps
	rm -rf $(SPEECH_ROAD)
	$(PY) -m scripts.bench_learning speech --work-dir .
	$(PY) -m scripts.demo_asr --checkpoint runs/synthetic/speech/export \
		--audio out/synthetic/spoken-digits/test/00000.wav
	head -n 1 out/synthetic/spoken-digits/test/answers.jsonl

# The web demo (gradio) on the image road's export, made first when missing (as `make demo` makes it); serves
# http://127.0.0.1:7860 until stopped (HOST / PORT override).
IMAGE_EXPORT := runs/synthetic/image_qa/export
HOST ?= 127.0.0.1
PORT ?= 7860

web-demo: $(STAMP) system-deps
	test -f $(IMAGE_EXPORT)/config.json || $(PY) -m scripts.bench_learning image --work-dir .
	$(PY) -m scripts.web_demo --checkpoint $(IMAGE_EXPORT) --host $(HOST) --port $(PORT)

test: $(STAMP) system-deps
	$(PY) -m pytest -q --durations=25

clean:
	rm -rf $(VENV) out runs .pytest_cache
