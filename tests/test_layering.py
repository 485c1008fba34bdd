"""aape/ is a plain library: only aape/integrations/ may import MLflow, and nothing imports Prefect or DVC."""

import ast
from pathlib import Path

AAPE = Path(__file__).resolve().parents[1] / "aape"
FORBIDDEN = {"prefect", "dvc", "mlflow"}


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_library_imports_no_orchestrator_or_tracker():
    offenders = {}
    for path in AAPE.rglob("*.py"):
        allowed = {"mlflow"} if "integrations" in path.relative_to(AAPE).parts else set()
        bad = (_imported_roots(path) & FORBIDDEN) - allowed
        if bad:
            offenders[str(path.relative_to(AAPE))] = sorted(bad)
    assert not offenders, f"library modules import orchestration/tracking packages: {offenders}"


def test_the_checker_sees_imports(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text("import prefect.flows\nfrom mlflow.tracking import MlflowClient\nfrom . import x\n")
    assert _imported_roots(sample) == {"prefect", "mlflow"}
