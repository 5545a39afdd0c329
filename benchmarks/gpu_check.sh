#!/usr/bin/env bash
# GPU checks for keras_ckpt.torch, in one go, printing every result:
#   1. the GPU tests (save from CUDA, restore on CPU, on CUDA and in a CUDA-less process;
#      exact resume on CUDA with deterministic settings), run directly from tests/torch_job.py
#      so pytest is not needed; with pytest installed, the whole tests/test_torch.py too;
#   2. the save benchmark with CUDA tensors, then with CPU tensors, on this machine's disk.
# Needs torch and numpy. Installs xxhash (required) and this package (editable, no deps) if
# they are missing; WHEELS=DIR installs from a local wheel directory instead of the network.
#
#   bash benchmarks/gpu_check.sh            # or: PYTHON=python3.12 WHEELS=/tmp/w bash ...
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)
if [ -n "${WHEELS:-}" ]; then PIP+=(--no-index --find-links "$WHEELS"); fi
status=0

echo "== environment"
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| cuda', torch.version.cuda, '| devices', [torch.cuda.get_device_name(i)
for i in range(torch.cuda.device_count())])" || exit 1
"$PY" -c "import xxhash" 2>/dev/null || "${PIP[@]}" xxhash \
  || echo "!! could not install xxhash (a required dependency); keras_ckpt will not import"
"$PY" -c "import keras_ckpt" 2>/dev/null || "${PIP[@]}" --no-deps -e . \
  || echo "!! could not install keras_ckpt (pip install -e . --no-deps)"
"$PY" -c "import pytest" 2>/dev/null || { [ -n "${WHEELS:-}" ] && "${PIP[@]}" pytest; } \
  || echo "(pytest is not installed: only the direct GPU checks run)"

echo "== GPU checks"
"$PY" - <<'EOF' || status=1
import sys, tempfile, time, traceback
sys.path.insert(0, "tests")
import torch
import torch_job

if not torch.cuda.is_available():
    sys.exit("!! no CUDA device visible")
failed = 0
for check in torch_job.GPU_CHECKS:
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as root:
            check(root)
        print(f"PASS {check.__name__} ({time.perf_counter() - start:.1f} s)", flush=True)
    except Exception:
        failed += 1
        print(f"FAIL {check.__name__}\n{traceback.format_exc()}", flush=True)
sys.exit(1 if failed else 0)
EOF

if "$PY" -c "import pytest" 2>/dev/null; then
  echo "== tests/test_torch.py (GPU tests included)"
  "$PY" -m pytest tests/test_torch.py -q -p no:cacheprovider --durations=5 || status=1
fi

echo "== save throughput, CUDA tensors"
"$PY" benchmarks/torch_save_throughput.py --device cuda --repeats 5 || status=1
echo "== save throughput, CPU tensors"
"$PY" benchmarks/torch_save_throughput.py --device cpu --repeats 5 || status=1
echo "== done (exit $status)"
exit $status
