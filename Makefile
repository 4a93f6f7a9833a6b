# `make demo` and `make test` work on a fresh clone: they create .venv if missing and install the project.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean system-deps

# Debian packages the tests call: Tesseract (OCR filter) and espeak-ng (synthetic speech); installed when
# running as root, else checked.
system-deps:
	@if ! command -v tesseract >/dev/null 2>&1 || ! tesseract --list-langs 2>/dev/null | grep -qx eng \
			|| ! command -v espeak-ng >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends tesseract-ocr tesseract-ocr-eng espeak-ng; \
		else echo "tesseract-ocr, tesseract-ocr-eng and espeak-ng are needed (apt-get install tesseract-ocr tesseract-ocr-eng espeak-ng)"; exit 1; fi; \
	fi

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP) system-deps
	$(PY) -m scripts.inspect_image assets/coffee.jpg --preset tiny --out runs/demo/coffee_tiles.png
	$(PY) -m scripts.demo_pipeline --out runs/demo
	$(PY) -m scripts.bench_learning video --save runs/demo/video
	$(PY) -m scripts.demo_video --checkpoint runs/demo/video/checkpoint \
		--video runs/demo/video/heldout/videos/00000.mp4 --question "Which way does the ball move?"
	head -n 1 runs/demo/video/heldout/records.jsonl
	$(PY) -m scripts.bench_learning speech --save runs/demo/speech
	$(PY) -m scripts.demo_asr --checkpoint runs/demo/speech/checkpoint \
		--audio runs/demo/speech/heldout/audio/00000.wav
	head -n 1 runs/demo/speech/heldout/records.jsonl

test: $(STAMP) system-deps
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) out runs .pytest_cache
