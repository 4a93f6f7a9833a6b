"""The synthetic tasks sit beside the data, not inside the models: they import only media-level helpers,
and nothing but scripts and tests imports them (they write raw files; the road reads those)."""

from tests.test_layering import ROOT, imported_modules

PROJECT = ("adapters", "common", "data_curation", "scripts", "speech", "synthetic", "training", "video", "vision")
# common: config, JSONL, export files (knows no model); speech.audio: wav decoding / resampling (media);
# speech.metrics: WER / CER for the scorer.
ALLOWED = ("synthetic", "common", "speech.audio", "speech.metrics")


def _project_imports(path) -> set[str]:
    return {m for m in imported_modules(path) if m.split(".")[0] in PROJECT}


def test_synthetic_imports_only_media_level_code():
    bad = {}
    for path in sorted((ROOT / "synthetic").rglob("*.py")):
        hits = sorted(m for m in _project_imports(path)
                      if not any(m == a or m.startswith(a + ".") for a in ALLOWED))
        if hits:
            bad[str(path.relative_to(ROOT))] = hits
    assert not bad, f"synthetic/ may import only {ALLOWED}: {bad}"


def test_only_scripts_and_tests_import_synthetic():
    importers = set()
    for package in PROJECT:
        if package in ("scripts", "synthetic"):
            continue
        for path in (ROOT / package).rglob("*.py"):
            if any(m == "synthetic" or m.startswith("synthetic.") for m in imported_modules(path)):
                importers.add(str(path.relative_to(ROOT)))
    assert not importers, f"only scripts/ and tests/ may import synthetic/: {sorted(importers)}"
