#!/usr/bin/env bash
# GPU benchmark suite: LJ throughput (N = 1e3, 1e4, 1e5), the two small-batch control
# workloads at B = 4,096 .. 65,536 and the paper's isomerization run on the GPU, with the
# JAX MD peers where jax_md imports; writes one JSON ($OUT/gpu_suite.json on the device
# machine, else ./gpu_suite.json, or --out FILE). Every argument goes to gpu_suite.py:
#
#   benchmarks/gpu.sh                                   # cuda, full sizes
#   benchmarks/gpu.sh --device cpu --dry-run --out /tmp/gpu_suite.json   # plumbing check
#
# Interpreter: $PYTHON if set, else the repository's .venv when it exists, else python3.
# The repository root goes on PYTHONPATH (nothing is installed). Wheels in .whl/ at the
# root (e.g. tomli-w, jax-md and its dependencies, carried to a machine that lacks them)
# are installed into a temporary folder first.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi
if compgen -G "$root/.whl/*.whl" > /dev/null; then
    site="$(mktemp -d)"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$root"/.whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" "$here/gpu_suite.py" "$@"
