#!/usr/bin/env bash
# Runs once inside the new conda env, from the working directory Snakemake was started in:
# installs this checkout's hipoa (dependencies come from the env file, hence --no-deps).
set -euo pipefail
if ! grep -q '^name = "hipoa"' pyproject.toml 2>/dev/null; then
  echo "post-deploy: run snakemake from the hipoa checkout (no hipoa pyproject.toml in $PWD)" >&2
  exit 1
fi
python -m pip install --no-deps .
