"""The synthetic tasks sit beside the data, not inside the models: they import only media-level helpers,
and nothing but scripts, tests and the in-process learning recipes (to be retired onto the shard road)
import them."""

from tests.test_layering import ROOT, imported_modules

PROJECT = ("adapters", "data_curation", "scripts", "speech", "synthetic", "training", "video", "vision")
# speech.audio: wav decoding / resampling (media); speech.metrics: WER / CER for the scorer.
ALLOWED = ("synthetic", "speech.audio", "speech.metrics")
# The in-process recipes that still render their own data; each goes when its proof runs on shards.
LEGACY_IMPORTERS = {"adapters/vqa.py", "video/vqa.py"}


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


def test_only_scripts_tests_and_legacy_recipes_import_synthetic():
    importers = set()
    for package in PROJECT:
        if package in ("scripts", "synthetic"):
            continue
        for path in (ROOT / package).rglob("*.py"):
            if any(m == "synthetic" or m.startswith("synthetic.") for m in imported_modules(path)):
                importers.add(str(path.relative_to(ROOT)))
    new = sorted(importers - LEGACY_IMPORTERS)
    assert not new, f"new importers of synthetic/: {new}"
