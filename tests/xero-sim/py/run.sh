#!/usr/bin/env bash
# Run the simulator's Python fidelity tests (schema tour + xero-python SDK).
# Creates target/pyenv on first use, builds the simulator binary, runs pytest.
set -euo pipefail
root="$(cd "$(dirname "$0")/../../.." && pwd)"
cd "$root"
[ -x target/pyenv/bin/python ] || python3 -m venv target/pyenv
target/pyenv/bin/pip install -q -r tests/xero-sim/py/requirements.txt
cargo build -q -p xero-sim
export XERO_SIM_BIN="${XERO_SIM_BIN:-$root/target/debug/xero-sim}"
exec target/pyenv/bin/python -m pytest -q tests/xero-sim/py "$@"
