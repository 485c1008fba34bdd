#!/usr/bin/env bash
# Command 2 of the README: set up, then run the whole test suite offline on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=1
# pytest exits non-zero when a test fails and with 5 when no test ran: both fail this script.
exec .venv/bin/python -m pytest -q "$@"
