"""aape/ is a plain library: only aape/integrations/ may import MLflow, and nothing imports Prefect or DVC."""

import ast
import subprocess
import sys
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


def _fresh_python(code: str) -> str:
    """What `code` prints in a new interpreter (so imports start from nothing)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=AAPE.parent).stdout.strip()


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


def test_stages_on_cached_features_do_not_import_the_image_stack():
    # torchvision's import pulls in torch._dynamo (about 3 s of every stage process on a 2-core
    # machine); stages that read cached features import it only when they load a backbone.
    stages = ["train_aggregator", "distill_generator", "evaluate", "train_baselines"]
    code = "; ".join(f"import aape.stages.{name}" for name in stages)
    code += "; import sys; print(sorted(m for m in ('torchvision', 'open_clip', 'torch._dynamo') if m in sys.modules))"
    assert _fresh_python(code) == "[]"


def test_building_a_transform_brings_torchvision_in():
    code = ("import sys; from aape.backbone import clip_eval_transform; assert 'torchvision' not in sys.modules; "
            "t = clip_eval_transform(32); print(type(t).__module__, 'torchvision' in sys.modules)")
    assert _fresh_python(code) == "torchvision.transforms.transforms True"
