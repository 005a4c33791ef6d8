"""Imports point one way: base (models, config, metrics) → analysis → data → train → sweep → views → command lines.

Every `import` in the package counts, also those inside functions: a function-local import of a
higher layer is the same upward dependency, only hidden.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fakedet"

# module (dotted, without the `fakedet.` prefix) → layer; a prefix ending in "." covers a package
LAYERS = [
    ("base", {"", "arrays", "config", "console", "models", "metrics", "provenance", "preprocess"}),
    ("analysis", {"analysis."}),  # pure functions over result tables: numpy, pandas, scipy, statsmodels only
    ("data", {"data."}),
    ("train", {"train", "bundle", "explain", "augment"}),
    ("sweep", {"sweep."}),
    ("views", {"results", "figures", "report"}),
    ("commands", {"cli", "__main__", "sweep_cli", "train_cli", "predict", "data.cli"}),
]


def layer_of(module: str) -> int:
    best = None
    for rank, (_, names) in enumerate(LAYERS):
        for name in names:
            if module == name or (name.endswith(".") and (module + ".").startswith(name)):
                # the most specific name wins (data.cli is a command, data.cache is data)
                if best is None or len(name) > best[1]:
                    best = (rank, len(name))
    assert best is not None, f"fakedet.{module} has no layer in tests/test_layers.py: add it where it belongs"
    return best[0]


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        out[".".join(parts)] = path
    return out


def imports(path: Path, module: str) -> set[str]:
    found = set()
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "fakedet"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if package else []
                name = ".".join(["fakedet", *[b for b in base if b], *([node.module] if node.module else [])])
            else:
                name = node.module or ""
            if name.split(".")[0] == "fakedet":
                found.add(name)
                # `from fakedet import figures` imports a module, not a name
                found |= {f"{name}.{a.name}" for a in node.names if (PACKAGE / Path(*name.split(".")[1:], a.name)).with_suffix(".py").exists()
                          or (PACKAGE / Path(*name.split(".")[1:], a.name)).is_dir()}
    return {n.removeprefix("fakedet").lstrip(".") for n in found}


def test_every_module_has_a_layer():
    for module in modules():
        layer_of(module)


def test_no_module_imports_a_higher_layer():
    upward = []
    for module, path in modules().items():
        mine = layer_of(module)
        for target in imports(path, module):
            if layer_of(target) > mine:
                upward.append(f"fakedet.{module} ({LAYERS[mine][0]}) imports fakedet.{target} ({LAYERS[layer_of(target)][0]})")
    assert not upward, "\n".join(sorted(upward))


# inside the sweep layer, tracking stacks the same way: the store, then the writer, then the Ray Tune callback
TRACKING_STACK = ["sweep.store", "sweep.writer", "sweep.tracking"]


def test_tracking_modules_import_only_those_below_them():
    found = modules()
    upward = []
    for rank, module in enumerate(TRACKING_STACK):
        above = set(TRACKING_STACK[rank + 1:])
        upward += [f"fakedet.{module} imports fakedet.{t}" for t in imports(found[module], module) if t in above]
    assert not upward, "\n".join(upward)
