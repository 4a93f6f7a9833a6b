"""Imports flow one way: raw -> data_curation -> shards -> training -> models -> scripts. Every import from one of
the project's packages into another, at module level or inside a function, must be an edge of `ALLOWED`; the
edges themselves follow the layer order; model and data code never touches distributed APIs."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTED = ("deepspeed", "torch.distributed")
DISTRIBUTED_HOMES = ("training", "scripts")  # the only homes of deepspeed / torch.distributed

# Layers, lowest first; a package imports only from layers strictly below its own (tests/ may import anything).
LAYER = {"common": 0, "media": 1, "synthetic": 2, "vision": 2, "data_curation": 2, "adapters": 3, "speech": 4,
         "training": 5, "scripts": 6}

# importer -> {imported: why}. A new downward edge gets a line here with its reason; an upward one is a redesign.
ALLOWED: dict[str, dict[str, str]] = {
    "common": {},  # the leaf: strict config <-> dict, presets, export files, JSONL, WER/CER, RoPE
    "media": {},  # image / video / audio decoding and tar shards need nothing of ours
    "synthetic": {
        "common": "the scorer reads JSONL answers and scores transcripts with common.metrics (WER / CER)",
        "media": "spoken digits are read back through media.audio, as any dataset's audio is",
    },
    "vision": {
        "common": "encoder presets go through common.presets",
        "media": "tiling converts decoded images (media.image.to_rgb); frame tiling takes media.video's frames",
    },
    "data_curation": {
        "common": "curation configs are read by common.config",
        "media": "curation decodes images, video and audio and reads tar shards; models only as scorers "
                 "(open_clip, SSCD), never through our model packages",
    },
    "adapters": {
        "common": "configs, export files, presets and RoPE",
        "vision": "the composed model holds the image encoder and projector",
    },
    "speech": {
        "common": "presets, export files and RoPE (the Conformer's rotary attention)",
        "adapters": "the speech model sits on the frozen Llama: chat format, token rows, decoding loop, checkpoints",
    },
    "training": {
        "common": "run configs, export files, RoPE (the pipeline stages)",
        "media": "the data streams read tar shards and decode their samples",
        "vision": "image and frame tiling in the codecs, CLIP's encoder",
        "adapters": "the image / video / text models, their tasks and the tokenizer",
        "speech": "the speech model, BEST-RQ pre-training and their checkpoints",
    },
    "scripts": {
        "common": "entry points read configs and exports",
        "media": "demos decode their inputs",
        "synthetic": "make_synthetic and the learning roads write and score the synthetic tasks",
        "vision": "demos and benchmarks tile images and build encoders",
        "adapters": "demos, exports and benchmarks of the models",
        "speech": "the ASR demo and evaluation",
        "data_curation": "the shard builders' command lines",
        "training": "python -m scripts.train and the benchmarks drive the trainer",
    },
}


def project_packages() -> set[str]:
    return {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests"}


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in the file, at any depth (functions, classes, branches), in line
    order; ``from m import x`` gives both ``m`` and ``m.x`` (so ``from torch import distributed`` is seen)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out += [(node.lineno, node.module), *((node.lineno, f"{node.module}.{a.name}") for a in node.names)]
    return sorted(out)


def test_every_package_has_a_row_of_the_matrix():
    assert project_packages() == set(ALLOWED) == set(LAYER)


def test_the_matrix_follows_the_layers():
    upward = [f"{a} -> {b}" for a, row in ALLOWED.items() for b in row if LAYER[b] >= LAYER[a]]
    assert not upward, f"edges against the layer order: {upward}"
    # nothing imports training or scripts but scripts; synthetic tasks and curation are reached by scripts alone
    for leaf in ("training", "scripts", "synthetic", "data_curation"):
        importers = sorted(a for a, row in ALLOWED.items() if leaf in row)
        assert importers in ([], ["scripts"]), f"{leaf} imported by {importers}"


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_follow_the_matrix(package):
    bad = {}  # file:line -> message, one per import statement
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, module in imports(path):
            top = module.split(".")[0]
            if top in ALLOWED and top != package and top not in ALLOWED[package]:
                where = f"{path.relative_to(ROOT)}:{line}"
                bad.setdefault(where, f"{where} imports {module} ({package} -> {top})")
    assert not bad, f"imports outside the allowed edges of {package}:\n" + "\n".join(bad.values())


@pytest.mark.parametrize("package", sorted(set(ALLOWED) - set(DISTRIBUTED_HOMES)))
def test_only_training_and_scripts_import_distributed_code(package):
    bad = [f"{path.relative_to(ROOT)}:{line} imports {module}"
           for path in sorted((ROOT / package).rglob("*.py"))
           for line, module in imports(path)
           if any(module == d or module.startswith(d + ".") for d in DISTRIBUTED)]
    assert not bad, f"{package} must stay single-device (no deepspeed / torch.distributed):\n" + "\n".join(bad)
