# `make demo` and `make test` work on a fresh clone: they create .venv if missing and install the project.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean system-deps

# Debian programs the tests and demos run: Tesseract (OCR filter), espeak-ng (synthetic speech), ffmpeg and
# ffprobe (test clips, bench_video). Installed when running as root, else checked; tests/system_deps.py names
# the same programs, and a test whose program is missing fails with the install command.
SYSTEM_PACKAGES := tesseract-ocr tesseract-ocr-eng espeak-ng ffmpeg
SYSTEM_PROGRAMS := tesseract espeak-ng ffmpeg ffprobe

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
