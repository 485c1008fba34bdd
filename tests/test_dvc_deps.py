"""dvc.yaml's code deps follow the code: a stage lists every project file its entry point imports
(transitively) or reads as package data, so `dvc repro` reruns it after any change to them.

Deps are single files, not folders, as in DVC's example-get-started (`deps: [src/prepare.py, ...]`):
a stage depends on exactly what it reads, so editing a module that only another stage imports (or a
test, or a cache file dropped into a package folder) does not invalidate its outputs. The cost is
that a new import must be added to dvc.yaml; this test names the file and the stage when one is
missing, and also refuses code deps the stage does not read, so the lists stay exact.
"""

from __future__ import annotations

import ast
import shlex
import sys
from pathlib import Path

import yaml

from aape.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "aape"

# Package data the code opens by path (invisible to an import scan): module -> files or folders it reads.
PACKAGE_DATA = {
    "aape/backbone.py": ["aape/model_configs"],
    "aape/features/baseline_templates.py": ["aape/features/baseline_templates.yaml"],
    "aape/prompts/templates.py": ["aape/prompts/templates.yaml"],
}


# Stages that build methods from the registry import their modules by name (importlib), which an import
# scan cannot see: they read every method module the registry names.
def _registry_modules() -> list[str]:
    from aape.methods.registry import METHODS

    return sorted({path.partition(":")[0] for spec in METHODS.values() for path in (spec.build, spec.train) if path})


REGISTRY_STAGES = {"train-baselines", "evaluate"}


# -- the import scan -------------------------------------------------------------------------------


def module_file(module: str) -> Path | None:
    """The file of a dotted project module (a package's __init__.py), or None when there is none."""
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_of(path: Path) -> str:
    name = module_name(path)
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def _absolute(node: ast.ImportFrom, path: Path) -> str:
    """The absolute module an ImportFrom names (`from ..x import y` inside aape/a/b.py is aape.x)."""
    if node.level == 0:
        return node.module or ""
    package = _package_of(path).split(".")
    base = ".".join(package[: len(package) - node.level + 1])
    return f"{base}.{node.module}" if node.module else base


def _is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and isinstance(test, (ast.Name, ast.Attribute)) and ast.unparse(test).endswith("TYPE_CHECKING")


def _nodes_run(tree: ast.AST):
    """Every node except the bodies of `if TYPE_CHECKING:` (those imports never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        children = node.orelse if _is_type_checking_block(node) else ast.iter_child_nodes(node)
        stack.extend(children)


def imported_modules(path: Path) -> set[str]:
    """Dotted project modules that `path` imports, anywhere in it (function-level imports too)."""
    found: set[str] = set()
    for node in _nodes_run(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(node, path)
            found.add(module)
            # `from aape.x import y` may import the submodule aape.x.y
            found.update(f"{module}.{alias.name}" for alias in node.names if module_file(f"{module}.{alias.name}"))
    return {m for m in found if m == PACKAGE or m.startswith(PACKAGE + ".")}


def _with_parents(module: str) -> list[str]:
    """Importing aape.x.y runs aape/__init__.py and aape/x/__init__.py first."""
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def files_imported(entry: Path) -> set[Path]:
    """`entry` and every project file importing it runs, transitively."""
    seen: set[Path] = set()
    todo = [entry, *(module_file(p) for p in _with_parents(_package_of(entry)))]
    while todo:
        path = todo.pop()
        if path is None or path in seen:
            continue
        seen.add(path)
        for module in imported_modules(path):
            todo.extend(module_file(m) for m in _with_parents(module))
    return seen


def files_read(entry: Path, stage: str | None = None) -> set[str]:
    """The repo-relative files and folders a stage's code consists of: imports (with the registry's
    method modules for the stages that build methods) plus package data."""
    entries = [entry] + ([module_file(m) for m in _registry_modules()] if stage in REGISTRY_STAGES else [])
    sources = {p.relative_to(ROOT).as_posix() for e in entries for p in files_imported(e)}
    return sources | {data for source in sources for data in PACKAGE_DATA.get(source, [])}


# -- dvc.yaml --------------------------------------------------------------------------------------


def dvc_stages() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def entry_point(cmd: str) -> Path:
    """`AAPE_ORCHESTRATOR=dvc aape evaluate` -> aape/stages/evaluate.py (the CLI's STAGES map)."""
    words = shlex.split(cmd)
    stage = words[words.index("aape") + 1]
    return ROOT / "aape" / "stages" / f"{STAGES[stage]}.py"


def code_deps(stage: dict) -> set[str]:
    return {d for d in stage.get("deps", []) if d.startswith(f"{PACKAGE}/")}


def covered(path: str, deps: set[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


# -- tests -----------------------------------------------------------------------------------------


def test_every_stage_runs_an_aape_stage_module():
    stages = dvc_stages()
    assert {name: entry_point(s["cmd"]).is_file() for name, s in stages.items()} == {name: True for name in stages}


def test_each_stage_lists_every_project_file_its_entry_point_reads():
    missing = {}
    for name, stage in dvc_stages().items():
        deps = code_deps(stage)
        absent = sorted(f for f in files_read(entry_point(stage["cmd"]), name) if not covered(f, deps))
        if absent:
            missing[name] = absent
    assert not missing, f"dvc.yaml stages lack code deps (add them to the stage's deps): {missing}"


def test_each_stage_lists_only_project_files_its_entry_point_reads():
    extra = {}
    for name, stage in dvc_stages().items():
        surplus = sorted(code_deps(stage) - files_read(entry_point(stage["cmd"]), name))
        if surplus:
            extra[name] = surplus
    assert not extra, f"dvc.yaml stages list code they do not read (remove it from the stage's deps): {extra}"


def test_package_data_map_names_every_data_file_of_the_package():
    data_files = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / PACKAGE).rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    }
    mapped = {d for targets in PACKAGE_DATA.values() for d in targets}
    assert {f for f in data_files if not covered(f, mapped)} == set()


# -- the scan itself -------------------------------------------------------------------------------


def _write(root: Path, rel: str, text: str = "") -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_the_scan_follows_every_import_form(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    for rel in ("aape/__init__.py", "aape/x/__init__.py", "aape/y.py", "aape/z.py", "aape/w.py", "aape/never.py", "aape/hint.py"):
        _write(tmp_path, rel)
    _write(tmp_path, "aape/x/sub.py", "from .. import w\n")  # relative, two levels up
    _write(tmp_path, "aape/x/deep.py", "def f():\n    import aape.z\n")  # inside a function
    entry = _write(
        tmp_path,
        "aape/stages/entry.py",
        "import numpy\nfrom aape.x import sub, deep\nfrom aape import y\n"
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from aape import hint\n",
    )
    assert {p.relative_to(tmp_path).as_posix() for p in files_imported(entry)} == {
        "aape/__init__.py", "aape/stages/entry.py", "aape/x/__init__.py", "aape/x/sub.py",
        "aape/x/deep.py", "aape/y.py", "aape/z.py", "aape/w.py",
    }  # fmt: skip
