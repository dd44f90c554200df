#!/usr/bin/env bash
# DataComp's effect at small scale (issue 33, acceptance 1; docs/curation.md): tiny-clip trained at equal steps on a
# noisy image-text pool (a) whole, (b) CLIP-score filtered, (c) filtered + SemDeDup, each scored by CIFAR-10 zero-shot
# top-1 (10,000 test images, the 10 CLIP templates of benchmarks/cifar10_zeroshot_templates.txt, none a training
# caption) and Flickr8k test retrieval recall@1/5 (1,000 photos, five captions each).
#
#  1. pool + clean split (benchmarks/bench_curate.py make-pool): Flickr8k training photos and 10,000 CIFAR-10
#     training images, 40% of captions shuffled onto other images, 5% junk captions, 10% near-duplicates added;
#     what was planted where is in $OUT/pool_info.json.
#  2. reference: tiny-clip trained on the clean split ($OUT/clean: the 35% of Flickr8k photos kept out of the pool,
#     with all five captions, + 5,000 CIFAR-10 images of train-0004): no pool sample, no test image. Not a
#     pretrained model: the shared data has none and the machines reach no model hub.
#  3. mm curate score: the pool's image-caption cosines under the reference.
#  4. mm curate filter: (b) --top-fraction $TOP, (c) the same + --semdedup-eps $EPS.
#  5. tiny-clip on (a), (b) and (c) (data.keep = the filter's keep.txt): same steps, batch, lr, seed.
#  6. mm eval of each (and of the reference), then the table (benchmarks/bench_curate.py table).
#
# Model and budget: tiny-clip at 64 px / patch 8 (64 patches, as at 32 px / 4, so CIFAR's 32 px photos are upscaled and
# Flickr's 160 px ones keep more detail; the bench_lora Flickr setting), batch 128, $STEPS steps = 44,800 samples:
# about 8-10 minutes a training on 2 CPU cores (tiny-clip at 64 patches trained at 77-80 samples/s alone on the
# 2-core machine in the NaFlex benchmark, docs/benchmarks.md; 100-140 in the step-only benchmark). That is ~2.8
# epochs of the whole pool and ~7 of the filtered one: equal compute, as in DataComp (a filtered pool is repeated).
#
# Resumable: each step is skipped when its output exists (make-pool: pool_info.json; training: final/, and an
# interrupted training resumes from its last checkpoint; scoring resumes itself; filters: report.json; eval:
# eval.json). Changing a knob below needs a new OUT (or deleting the outputs it affects).
#
#   OMP_NUM_THREADS=2 benchmarks/run_curate.sh                # ~45-55 min on 2 cores
#   OUT=/tmp/c LIMIT=300 STEPS=5 benchmarks/run_curate.sh     # smoke test of the chain: 5-step trainings (~6 min,
#                                                             # mostly the evaluations of the full test sets)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/runs/curate}
MM=${MM:-.venv/bin/mm}
PY=${PY:-.venv/bin/python}
STEPS=${STEPS:-350}          # training steps of every run (the reference's too)
BATCH=${BATCH:-128}
SEED=${SEED:-0}
# CLIP-score top fraction. Planted noise is ~45% of the originals (40% shuffled, ~5% of those onto an image of the
# same CIFAR class, so still right, + 5% junk), so ~55% of the pool is right. Keeping 40% (between DataComp's best
# top-30% for web pools, where most pairs are poor, and the 55% that are right here) leaves the weak reference a
# margin for ranking errors, keeps up to ~70% of the right pairs and repeats the kept set ~7 times, not more.
TOP=${TOP:-0.4}
# SemDeDup eps (near-duplicates: image cosine > 1 - EPS). The planted copies are resized by 5-20% and re-encoded,
# then resized to the model's 64 px: nearly the same input. But this small reference packs its image embeddings
# tightly: on the CLIP-score-kept set a distinct image's nearest neighbour has cosine 0.991 (median) and 0.980 (5th
# percentile), so the first try, 0.02, removed 74% of the kept set (4,776 of 6,428), nearly all distinct images.
# 0.003 is where distinct images rarely fall: 1% of the kept non-duplicates have a neighbour that close, 56% of the
# planted pairs do (the table reports the removal's precision and recall on the planted pairs). With a strong
# pretrained reference SemDeDup's own range (0.01-0.1) applies.
EPS=${EPS:-0.003}
LIMIT=${LIMIT:-}             # read at most N samples of each source (a smoke test); empty: all
D=../shared/datasets
CIFAR_TEST=$D/cifar10/test-0000.tar.gz
FLICKR_TEST=$D/flickr8k/test-0000.tar
TEMPLATES=benchmarks/cifar10_zeroshot_templates.txt
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

COMMON=(model=tiny-clip model.vision.image_size=64 model.vision.patch_size=8
        data.batch_size=$BATCH data.workers=2 data.shuffle_buffer=2000
        train.steps=$STEPS train.lr=1e-3 train.warmup_steps=$(( STEPS / 10 > 0 ? STEPS / 10 : 1 ))
        train.weight_decay=0.1 train.grad_clip=null train.seed=$SEED
        train.checkpoint_every=100 train.keep_checkpoints=1 train.resume=auto train.log_every=10)

train() {  # NAME DATA [overrides...]
    local name=$1 data=$2; shift 2
    if [ -d $OUT/runs/$name/final ]; then echo "== $name: trained ($OUT/runs/$name/final)"; return; fi
    echo "== $name: training $STEPS steps"
    $MM train "${COMMON[@]}" data.train="$data" output_dir=$OUT/runs/$name "$@"
}

evaluate() {  # NAME
    local name=$1
    if [ -f $OUT/runs/$name/eval.json ]; then return; fi
    echo "== $name: evaluating"
    $MM eval --model $OUT/runs/$name/final --zeroshot $CIFAR_TEST --templates $TEMPLATES \
        --retrieval $FLICKR_TEST --batch-size 250 --out $OUT/runs/$name/eval.json
}

# 1. the pool and the clean split
mkdir -p $OUT
$PY benchmarks/bench_curate.py make-pool $OUT --seed $SEED ${LIMIT:+--limit $LIMIT}
POOL=$($PY benchmarks/bench_curate.py get $OUT pool_spec)
CLEAN=$($PY benchmarks/bench_curate.py get $OUT clean_spec)

# 2. the reference model, on the clean split (five captions per Flickr photo, one drawn per epoch)
train ref "$CLEAN" data.random_caption=true
evaluate ref

# 3. score the pool with it
if [ ! -f $OUT/scores/scores.json ]; then
    $MM curate score --model $OUT/runs/ref/final --data "$POOL" --out $OUT/scores --batch-size 128
fi

# 4. filter: (b) CLIP score, (c) CLIP score + SemDeDup (clusters: ~1 per 60 kept samples)
[ -f $OUT/filter_top/report.json ] || \
    $MM curate filter --scores $OUT/scores --out $OUT/filter_top --top-fraction $TOP
[ -f $OUT/filter_top_dedup/report.json ] || \
    $MM curate filter --scores $OUT/scores --out $OUT/filter_top_dedup --top-fraction $TOP \
        --semdedup-eps $EPS --semdedup-clusters 100 --seed $SEED

# 5. the three trainings, equal steps / batch / seed
train a "$POOL"
train b "$POOL" data.keep=$OUT/filter_top/keep.txt
train c "$POOL" data.keep=$OUT/filter_top_dedup/keep.txt

# 6. evaluation and the table
for r in a b c; do evaluate $r; done
$PY benchmarks/bench_curate.py table $OUT | tee $OUT/table.md
