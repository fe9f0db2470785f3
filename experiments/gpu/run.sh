#!/usr/bin/env bash
# The GPU suite in one command, on a GPU machine without network (experiments/gpu/README.md):
# installs clustr_jax with --no-deps over the image's JAX plus the wheels carried in .whl/
# (experiments/gpu/fetch_wheels.sh), then runs experiments/gpu/suite.py, which writes
# experiments/results/gpu/ (or $OUT/gpu when OUT is set, as on the device machine).
#
#   bash experiments/gpu/run.sh [suite.py flags]
set -uo pipefail
cd "$(dirname "$0")/../.."
export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
start=$(date +%s)
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install --quiet --no-deps .whl/*.whl || echo "run.sh: installing .whl/ failed"
else
  echo "run.sh: no .whl/ folder: run experiments/gpu/fetch_wheels.sh where there is network"
fi
# The package itself; the repository on PYTHONPATH as well, so that a failed editable install
# (no setuptools on the image) still leaves clustr_jax and configs importable.
python3 -m pip install --quiet --no-deps --no-build-isolation -e . \
  || echo "run.sh: editable install failed; using PYTHONPATH"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "run.sh: installed in $(( $(date +%s) - start )) s"
python3 -c "import jax, clustr_jax, tokamax; print('jax', jax.__version__, jax.devices())"
output=()
if [[ -n "${OUT:-}" ]]; then
  output=(--output_dir="$OUT/gpu" --workdir=/tmp/gpu_suite_work)
fi
python3 experiments/gpu/suite.py "${output[@]}" "$@"
status=$?
echo "run.sh: finished in $(( $(date +%s) - start )) s (exit $status)"
exit $status
