#!/usr/bin/env bash
# Retrieval-augmented zero-shot (RECO) on CIFAR-10 (docs/benchmarks.md, "Retrieval-augmented zero-shot"): the plain
# Flickr8k tiny-coca of benchmarks/run_retrieval.sh, zero-shot on the 10,000 CIFAR-10 test images, plain and with a
# RECO datastore of image-text pairs: Flickr8k's training photos with their captions and CIFAR-10's training images
# with their templated captions (the test images are not in it).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/runs/retrieval}
MM=${MM:-.venv/bin/mm}
M=${M:-$OUT/plain/final}
C=../shared/datasets/cifar10
T=benchmarks/cifar10_zeroshot_templates.txt
# two sources (their sample keys both count from 000000)
$MM reco --model $M --images "../shared/datasets/flickr8k/train-{0000..0003}.tar" --images "$C/train-{0000..0004}.tar.gz" \
    --out $OUT/reco --k 8 --steps 1000 --workers 1
$MM zeroshot --model $M $C/test-0000.tar.gz --templates $T --workers 1 --out $OUT/zeroshot-plain.csv | sed -n 1p
$MM zeroshot --model $M $C/test-0000.tar.gz --templates $T --workers 1 --datastore $OUT/reco --out $OUT/zeroshot-reco.csv \
    | sed -n 1p
