#!/usr/bin/env bash
# The demo pipeline on synthetic data; `make demo` runs it inside the project's virtualenv.
# Data goes under ./mipseg_data unless MIPSEG_RAW/MIPSEG_PREPROCESSED/MIPSEG_RESULTS say otherwise.
set -euo pipefail
ID=${DEMO_DATASET_ID:-900}

echo "== 1. synthesize a vessel dataset (Dataset${ID})"
mipseg_synthesize -d "$ID" --kind vessels --cases 12 --shape 64 96 96 --seed 0 --overwrite
echo "== 2. validate it"
mipseg_validate -d "$ID" --require-annotations
