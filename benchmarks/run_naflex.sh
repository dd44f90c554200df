#!/usr/bin/env bash
# The three runs of the NaFlex comparison (docs/benchmarks.md, "NaFlex"): tiny-clip on the built-in mixed-aspect set,
# the same steps and patch positions per step (8,192: 128 images of 64 patches); NaFlex (each image at its own aspect
# ratio, data/naflex.yaml), squash (the whole image resized to 32 x 32) and centre crop (the middle square, the default
# transforms' treatment of a wide image). Then benchmarks/bench_naflex.py scores the final models by aspect ratio.
# Needs data/aspect (mm shards builtin data/aspect --aspect).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/runs/naflex}
MM=${MM:-.venv/bin/mm}
SQUARE="data.naflex=null data.batch_size=128"
$MM train data/naflex.yaml output_dir=$OUT/naflex "$@"
# crop_ratio wide enough for every image's aspect ratio with crop_scale [1, 1]: the whole image, squashed
$MM train data/naflex.yaml output_dir=$OUT/squash $SQUARE data.crop_ratio=[0.2,5] model.vision.resize_mode=squash "$@"
# the default aspect range cannot cover a 4:1 image at full area: torchvision's rule falls back to the centre crop
$MM train data/naflex.yaml output_dir=$OUT/crop $SQUARE model.vision.resize_mode=shortest "$@"
