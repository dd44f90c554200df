#!/usr/bin/env bash
# Retrieval-augmented captioning on Flickr8k (docs/benchmarks.md, "Retrieval-augmented captioning"): the same
# tiny-coca (64 px, context 96), data, steps and batch, trained plain and with 4 retrieved captions in the decoder's
# prompt (SmallCap); the retrieval model is the plain run itself. Then both caption the 1,000 test photos (the RA
# model with the Flickr8k training captions as its datastore) and the built-in scenes' test images (domain swap:
# the RA model with the scenes' own training captions as datastore, no training), scored by
# benchmarks/bench_retrieval_caption.py. Needs data/scenes (mm shards builtin data/scenes --scenes).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/runs/retrieval}
MM=${MM:-.venv/bin/mm}
PY=${PY:-.venv/bin/python}
STEPS=${STEPS:-300}
F=../shared/datasets/flickr8k
TRAIN="$F/train-{0000..0003}.tar"
COMMON=(model.vision.image_size=64 model.vision.patch_size=8 model.text.context_length=96 train.steps=$STEPS
        data.batch_size=64 train.checkpoint_every=100 eval.captioning.shards=null)
GEN=(--method beam --num-beams 3 --max-new-tokens 30 --min-new-tokens 3 --no-repeat-ngram 3 --json)
mkdir -p $OUT
# 1. plain (also the retrieval model)
$MM train benchmarks/configs/flickr8k_coca.yaml output_dir=$OUT/plain "${COMMON[@]}"
P=$OUT/plain/final
# 2. the datastore (Flickr8k training captions) and what each training photo retrieves (never its own captions)
$MM embed --model $P --texts "$TRAIN" --out $OUT/emb/flickr-captions
$MM embed --model $P --images "$TRAIN" --out $OUT/emb/flickr-train
$MM retrieve --datastore $OUT/emb/flickr-captions --queries $OUT/emb/flickr-train --out $OUT/retrieved.jsonl --k 4
# 3. retrieval-augmented
$MM train benchmarks/configs/flickr8k_coca.yaml output_dir=$OUT/ra "${COMMON[@]}" \
    data.retrieval.captions=$OUT/retrieved.jsonl data.retrieval.k=4
R=$OUT/ra/final
# 4. Flickr8k test photos
test -d $OUT/flickr-test || $MM shards extract $F/test-0000.tar $OUT/flickr-test
$MM caption --model $P $OUT/flickr-test "${GEN[@]}" | grep '^{' > $OUT/plain-flickr.jsonl
$MM caption --model $R $OUT/flickr-test --datastore $OUT/emb/flickr-captions --k 4 "${GEN[@]}" | grep '^{' > $OUT/ra-flickr.jsonl
$PY benchmarks/bench_retrieval_caption.py --shards $F/test-0000.tar $OUT/plain-flickr.jsonl $OUT/ra-flickr.jsonl
# 5. domain swap: scenes, with the Flickr8k datastore and with the scenes' own captions (no training)
S=data/scenes
test -d $OUT/scenes-test || $MM shards extract $S/test-000000.tar.gz $OUT/scenes-test -n 500
$MM embed --model $P --texts "$S/train-{000000..000006}.tar.gz" --out $OUT/emb/scenes-captions
$MM caption --model $P $OUT/scenes-test "${GEN[@]}" | grep '^{' > $OUT/plain-scenes.jsonl
$MM caption --model $R $OUT/scenes-test --datastore $OUT/emb/flickr-captions --k 4 "${GEN[@]}" | grep '^{' > $OUT/ra-flickrstore-scenes.jsonl
$MM caption --model $R $OUT/scenes-test --datastore $OUT/emb/scenes-captions --k 4 "${GEN[@]}" | grep '^{' > $OUT/ra-scenesstore-scenes.jsonl
$PY benchmarks/bench_retrieval_caption.py --shards $S/test-000000.tar.gz $OUT/plain-scenes.jsonl \
    $OUT/ra-flickrstore-scenes.jsonl $OUT/ra-scenesstore-scenes.jsonl
