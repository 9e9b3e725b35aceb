#!/usr/bin/env bash
# Regenerate the version locks from the Python environment in which the tests passed:
#
#   pip install -e '.[test]' && python -m pytest -q && requirements/lock.sh
#
# cpu.txt: hipoa's dependencies and its test extra, at the versions installed now (CI installs
# exactly these, .ci/run). gpu.txt: the same versions plus TensorFlow's CUDA wheels (the `gpu`
# extra), for GPU nodes. Both are resolved by uv for Linux x86_64 and Python 3.11, with the
# installed versions as constraints, so a lock never names a version the tests did not run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
command -v uv >/dev/null || { echo "lock.sh: needs uv (pip install uv)" >&2; exit 1; }
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
python -m pip freeze --all --exclude-editable | grep -v -i -E '^(hipoa|uv|pip)(==| @)' >"$constraints"
lock() { # extra output description
    {
        echo "# hipoa $(python -c 'import hipoa; print(hipoa.__version__)'): $3."
        echo "# Made by requirements/lock.sh from the environment the tests passed in; do not edit."
        echo "# Install: pip install -r requirements/$2 -e . --no-deps"
        uv pip compile pyproject.toml --extra "$1" --constraint "$constraints" \
            --python-version 3.11 --python-platform x86_64-manylinux_2_28 --no-header \
            --annotation-style line --quiet |
            sed -e "s|, -c $constraints||" -e "s|-c $constraints, ||" -e "s|  *# via -c $constraints$||"
    } >"requirements/$2.tmp"
    mv "requirements/$2.tmp" "requirements/$2"
    echo "requirements/$2: $(grep -c '^[a-z]' "requirements/$2") packages"
}
lock test cpu.txt "CPU machines and CI (dependencies + the test extra)"
lock gpu gpu.txt "GPU nodes (dependencies + TensorFlow's CUDA wheels)"
