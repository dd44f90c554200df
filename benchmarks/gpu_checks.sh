#!/usr/bin/env bash
# Every check that needs a GPU (issues 5, 7, 8, 19, 20, 21, 27 and 30), as one prepared pass sized for one H200; the limits
# add up to more than one 10-minute command: run it as two (ONLY="info train infer data", then the rest). Each step has its own time limit, so one hang costs only its slot; logs go to
# $OUT (the device tool's output folder) or benchmarks/runs/gpu.
#
#   bash benchmarks/gpu_checks.sh                 # everything (limits add up to 940 s; expect ~11 min)
#   ONLY="train moe" bash benchmarks/gpu_checks.sh  # some steps
#
# The device image has Python 3.12 with torch, accelerate, safetensors, matplotlib, pytest; mm's other
# dependencies travel as wheels in .whl (git-ignored through .git/info/exclude), fetched here once:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     open_clip_torch==3.3.0 webdataset==1.0.2 braceexpand==0.1.7 ftfy==6.3.1 wcwidth==0.2.13 timm \
#     fastapi starlette uvicorn h11 click python-multipart anyio sniffio pydantic pydantic-core \
#     annotated-types typing-inspection   # the last two lines: the serve step (mm serve)
# and the device command is (carry: [".whl"]):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
#     PYTHONPATH=/tmp/site:. PY=python3 bash benchmarks/gpu_checks.sh
# The probe step (issue 27: mm benchmark's linear probe = clip_benchmark's, which runs only on CUDA) needs
# clip_benchmark with numpy < 2.3 and scikit-learn (61 MiB of wheels: a call of its own, carry [".whl-cb"]):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d .whl-cb \
#     clip-benchmark==1.6.2 'numpy<2.3' 'scikit-learn>=1,<2' scipy joblib threadpoolctl tqdm
#   ONLY=probe PY=python3 bash benchmarks/gpu_checks.sh   # no other wheels needed: the probe reads features only
set -u
OUT=${OUT:-benchmarks/runs/gpu}
PY=${PY:-.venv/bin/python}
ONLY=${ONLY:-"info train infer data moe sparse lora gradcache serve naflex tests"}  # and probe, a call of its own
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS CMD...: run, keep the log, print its tail
    local name=$1 limit=$2
    shift 2
    case " $ONLY " in *" $name "* | *" ${name%%_*} "*) ;; *) return 0 ;; esac
    echo "=== $name ($limit s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "--- rc=$? in $((SECONDS - t0)) s"
    tail -n 12 "$OUT/$name.log"
}

step info 20 bash -c "nvidia-smi; $PY -c 'import torch, open_clip, webdataset; print(torch.__version__, open_clip.__version__, torch.cuda.get_device_name())'"

# Issue 7, acceptance 2: ViT-B-16 b256 bf16 eager and compiled (MFU vs 793 TFLOP/s), ViT-B-32 b512, CoCa.
TRAIN="$PY benchmarks/bench_train.py --precision bf16 --peak-tflops 793"
step train_b16 60 $TRAIN --model ViT-B-16 --batch 256 --steps 8
step train_b16_compiled 150 $TRAIN --model ViT-B-16 --batch 256 --steps 8 --compile
step train_b32 45 $TRAIN --model ViT-B-32 --batch 512 --steps 10
step train_coca 50 $TRAIN --model coca_ViT-B-32 --batch 256 --steps 8

# Issue 7, acceptance 3: training from JPEG shards vs the synthetic-data step rate (ViT-B-32, b512).
step data 90 $PY benchmarks/bench_data.py --make-shards /tmp/jpegs --n 8192 \
    --shards '/tmp/jpegs/train-{000000..000007}.tar' --batch 512 --workers 15 --batches 12 --train ViT-B-32

# Issue 5, acceptance 3 / issue 7: embedding throughput, mm embed vs a plain open_clip loop.
step infer 45 $PY benchmarks/bench_infer.py --model ViT-B-32 --n 4096 --batch-size 1024 --workers 15 --repeats 2

# Issue 8, acceptance 3 (and issue 7's MoE dispatch): MoE vs dense twin; sparse vs dense attention at 4k.
step moe 50 $PY benchmarks/bench_moe.py --model ViT-B-16-moe --batch 256 --precision bf16 --steps 10
step sparse 65 $PY benchmarks/bench_sparse.py --depth 12

# Issue 19, acceptance 3: ViT-B-16 peak training memory and step time, full fine-tuning vs LoRA rank 8, b256 bf16.
step lora 60 $PY benchmarks/bench_lora.py memory --device cuda --bf16 --batch 256 --steps 6

# Issue 20, acceptances 2 and 4: gradient caching, ViT-B-32 peak memory at global batch 256 / 1024 / 4096 (chunk 256)
# with and without caching; ViT-B-16 at a batch that does not fit uncached (cached only), samples/s and peak memory.
GC="$PY benchmarks/bench_grad_cache.py memory --device cuda --bf16 --chunk 256"
step gradcache_b32 90 $GC --model ViT-B-32 --batches 1024 4096
step gradcache_b16 80 $GC --model ViT-B-16 --batches 4096 --no-plain

# Issue 21, acceptance 3: mm serve on the GPU, 1/8/32/128 clients, batching vs one call per request (ViT-B-32).
step serve 90 $PY benchmarks/bench_serve.py --device cuda --duration 8 --rss-requests 0

# Issue 27, acceptance 1: the linear probe equals clip_benchmark's own on CUDA (4 cases: wd search, no val, few-shot,
# fp16 autocast); needs .whl-cb (above).
step probe 150 bash -c "$PY -m pip install -q --no-index --no-deps --target /tmp/cb .whl-cb/*.whl && \
    $PY benchmarks/check_probe_cuda.py --cb-path /tmp/cb"

# Issue 30, acceptance 4: the NaFlex path's training step against the square path at equal positions per batch
# (ViT-B-16, 196 positions, b256 bf16): square images as Patches (the path's own cost) and mixed aspect ratios (padding).
step naflex 60 $PY benchmarks/bench_naflex.py speed --model ViT-B-16 --batch 256 --repeats 6 --bf16

# The CUDA-only tests (compiled flex_attention) and the device paths of the rest.
step tests 45 $PY -m pytest -x tests/test_sparse_attention.py tests/test_layers.py tests/test_device_decode.py
