#!/usr/bin/env bash
# GPU checks for keras_ckpt.torch, in one go, printing every result:
#   1. the GPU tests (save from CUDA; restore on CPU, on CUDA and in a process that sees no CUDA
#      device; exact resume on CUDA with deterministic settings): with pytest, the whole of
#      tests/test_torch.py, GPU tests included; without it, the GPU checks run directly from
#      tests/torch_job.py;
#   2. the save benchmark with CUDA tensors, then with CPU tensors, on this machine's disk.
# Needs torch and numpy. Uses this checkout (PYTHONPATH; no install needed) and installs
# xxhash (a required dependency) if it is missing; WHEELS=DIR installs it (and pytest) from a
# local wheel directory instead of the network.
#
#   bash benchmarks/gpu_check.sh            # or: PYTHON=python3.12 WHEELS=/tmp/w bash ...
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
PIP=("$PY" -m pip install --quiet --disable-pip-version-check --retries 1 --timeout 10)
if [ -n "${WHEELS:-}" ]; then PIP+=(--no-index --find-links "$WHEELS"); fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

echo "== environment"
"$PY" -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| cuda', torch.version.cuda, '| devices', [torch.cuda.get_device_name(i)
for i in range(torch.cuda.device_count())])" || exit 1
"$PY" -c "import xxhash" 2>/dev/null || "${PIP[@]}" xxhash \
  || echo "!! could not install xxhash (a required dependency): keras_ckpt will not import"
if [ -n "${WHEELS:-}" ]; then "$PY" -c "import pytest" 2>/dev/null || "${PIP[@]}" pytest; fi

if "$PY" -c "import pytest" 2>/dev/null; then
  echo "== tests/test_torch.py (GPU tests included)"
  "$PY" -m pytest tests/test_torch.py -v -p no:cacheprovider -rs --durations=5 || status=1
else
  echo "== GPU checks (pytest is not installed: run directly)"
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
fi

echo "== save throughput, CUDA tensors"
"$PY" benchmarks/torch_save_throughput.py --device cuda --repeats 5 || status=1
echo "== save throughput, CPU tensors"
"$PY" benchmarks/torch_save_throughput.py --device cpu --repeats 5 || status=1
echo "== done (exit $status)"
exit $status
