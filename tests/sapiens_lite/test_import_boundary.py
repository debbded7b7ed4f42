"""Dependency rules of docs/ARCHITECTURE.md: three floors, arrows pointing down only.

- `sapiens_lite` (runs models) imports nothing of ours above it and none of deepspeed, webdataset,
  pycocotools, transformers.
- `sapiens_train` (the shared training machinery) imports DeepSpeed and webdataset like any library and
  never the recipes (`pretrain`, `finetune`); no function takes a library module as an argument.
- `pretrain` and `finetune` never import each other; transformers only in tests and benchmarks.

Checked twice: dynamically (a fresh interpreter imports every sapiens_lite module and looks at
sys.modules) and statically (the import statements of every file, including imports inside functions
and `importlib.import_module("...")` calls, so a lazy import cannot slip through).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN_IN_LITE = {
    "deepspeed",
    "webdataset",
    "pycocotools",
    "sapiens_train",
    "pretrain",
    "finetune",
    "transformers",
}
RECIPES = {"pretrain", "finetune"}
# Names a library module would travel under if it were passed as an argument.
MODULE_ARGUMENT_NAMES = {"deepspeed", "ds_module", "wds", "webdataset", "pycocotools", "coco_module"}


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module a file imports (anywhere in it)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.add(node.args[0].value.split(".")[0])
    return found


def py_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_importing_every_sapiens_lite_module_loads_no_training_code():
    code = """
import importlib, pkgutil, sys
import sapiens_lite
FORBIDDEN = set(sys.argv[1:])
names = [m.name for m in pkgutil.walk_packages(sapiens_lite.__path__, "sapiens_lite.")]
for name in names:
    importlib.import_module(name)
print("MODULES", len(names))
bad = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
print("FORBIDDEN", bad)
"""
    proc = subprocess.run(
        [sys.executable, "-c", code, *sorted(FORBIDDEN_IN_LITE)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FORBIDDEN []" in proc.stdout, proc.stdout
    # the walk really saw the package (models, hub, keypoints, config, ...)
    assert int(proc.stdout.split("MODULES")[1].split()[0]) >= 8


@pytest.mark.parametrize("path", py_files("sapiens_lite"), ids=lambda p: str(p.relative_to(ROOT)))
def test_sapiens_lite_files_import_no_training_code(path):
    assert not imported_modules(path) & FORBIDDEN_IN_LITE


def test_lite_and_predict_load_no_training_library_in_a_fresh_interpreter():
    """What `pip install sapiens-toolkit` users import: the package, `load_model` and prediction."""
    code = (
        "import sys, sapiens_lite, sapiens_lite.predict, sapiens_lite.loading\n"
        "from sapiens_lite import load_model\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in set(sys.argv[1:])))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *sorted(FORBIDDEN_IN_LITE)], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"


def test_importing_sapiens_train_loads_no_recipe():
    code = """
import importlib, pkgutil, sys
import sapiens_train
for m in pkgutil.walk_packages(sapiens_train.__path__, "sapiens_train."):
    importlib.import_module(m.name)
print(sorted(m for m in sys.modules if m.split(".")[0] in ("pretrain", "finetune")))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("path", py_files("sapiens_train"), ids=lambda p: str(p.relative_to(ROOT)))
def test_sapiens_train_files_import_no_recipe(path):
    assert not imported_modules(path) & (RECIPES | {"transformers"})


def test_no_function_takes_a_library_module_as_an_argument():
    """Libraries are imported where they are used; none travels as a parameter (`Engine(deepspeed, ...)`)."""
    offenders = []
    for package in ("sapiens_lite", "sapiens_train", "pretrain", "finetune"):
        for path in py_files(package):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                    args = node.args
                    names = {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]}
                    if names & MODULE_ARGUMENT_NAMES:
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, offenders


def test_training_packages_do_not_import_each_other():
    for package, other in (("pretrain", "finetune"), ("finetune", "pretrain")):
        for path in py_files(package):
            imports = imported_modules(path)
            assert other not in imports, f"{path.relative_to(ROOT)} imports {other}"
            assert "transformers" not in imports, f"{path.relative_to(ROOT)} imports transformers"


def test_the_static_check_sees_lazy_and_dynamic_imports(tmp_path):
    f = tmp_path / "x.py"
    f.write_text(
        "import os\n"
        "def f():\n"
        "    import deepspeed.comm as dist\n"
        "    from webdataset import WebDataset\n"
        "    importlib.import_module('pretrain.mae')\n"
        "from . import sibling\n"
        "# import finetune  (a comment is not an import)\n"
        "s = 'pycocotools'\n"
    )
    assert imported_modules(f) == {"os", "deepspeed", "webdataset", "pretrain"}
