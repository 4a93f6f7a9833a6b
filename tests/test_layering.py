"""Imports flow one way: scripts -> training -> model packages; model code never touches distributed APIs."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODEL_PACKAGES = ("vision", "video", "speech", "adapters", "data_curation")
DISTRIBUTED = ("deepspeed", "torch.distributed")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


@pytest.mark.parametrize("package", MODEL_PACKAGES)
def test_model_packages_import_no_distributed_code_and_no_scripts(package):
    bad = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        hits = sorted(m for m in imported_modules(path)
                      if m.startswith(("scripts", "training")) or any(m == d or m.startswith(d + ".")
                                                                      for d in DISTRIBUTED))
        if hits:
            bad[str(path.relative_to(ROOT))] = hits
    assert not bad, f"model packages must not import distributed code, training/ or scripts/: {bad}"


def test_training_does_not_import_scripts():
    bad = {str(p.relative_to(ROOT)): sorted(m for m in imported_modules(p) if m.startswith("scripts"))
           for p in (ROOT / "training").rglob("*.py")}
    assert not {k: v for k, v in bad.items() if v}
