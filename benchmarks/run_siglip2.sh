#!/usr/bin/env bash
# The three runs of the SigLIP 2 comparison (docs/benchmarks.md, "SigLIP 2 recipe"): the same model, data, steps and
# batch; plain SigLIP (the decoder removed), + LocCa's decoder, + decoder + self-distillation + masked prediction.
# Then benchmarks/bench_siglip2.py scores the three final models. Needs data/scenes (mm shards builtin data/scenes --scenes).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/runs/siglip2}
MM=${MM:-.venv/bin/mm}
$MM train data/siglip2.yaml output_dir=$OUT/siglip model.decoder=null train.objectives=null "$@"
$MM train data/siglip2.yaml output_dir=$OUT/decoder train.objectives.self_distill=null train.objectives.masked=null "$@"
$MM train data/siglip2.yaml output_dir=$OUT/recipe "$@"
