#!/usr/bin/env bash
# Mutation-test keras_ckpt's pure core (policy.py, manifest.py) against their own unit tests.
#
#   bash tools/mutmut.sh            # creates /tmp/mutvenv (mutmut 3.x) once, runs in /tmp/mutwork
#   cd /tmp/mutwork && /tmp/mutvenv/bin/mutmut results      # the survivors
#   /tmp/mutvenv/bin/mutmut show <mutant name>
#
# It works on a scratch copy (mutmut rewrites the sources it mutates), so the checkout is never
# touched. The core imports only numpy and xxhash, so the venv needs no framework.
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-/tmp/mutwork}
VENV=${MUTVENV:-/tmp/mutvenv}
[ -x "$VENV/bin/mutmut" ] || {
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "mutmut>=3,<4" pytest hypothesis numpy xxhash
}
rm -rf "$WORK" && mkdir -p "$WORK/keras_ckpt" "$WORK/tests"
cp "$SRC"/keras_ckpt/{__init__,_version,_fileobj,_stream,storage,policy,manifest}.py "$WORK/keras_ckpt/"
cp "$SRC"/tests/{conftest,test_policy,test_manifest}.py "$WORK/tests/"
cat > "$WORK/setup.cfg" <<'CFG'
[mutmut]
source_paths =
    keras_ckpt/policy.py
    keras_ckpt/manifest.py
also_copy =
    keras_ckpt/__init__.py
    keras_ckpt/_version.py
    keras_ckpt/_fileobj.py
    keras_ckpt/_stream.py
    keras_ckpt/storage.py
pytest_add_cli_args_test_selection =
    tests/test_policy.py
    tests/test_manifest.py
pytest_add_cli_args =
    -p
    no:cacheprovider
CFG
cd "$WORK"
"$VENV/bin/mutmut" run --max-children 2 "$@"
