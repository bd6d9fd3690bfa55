#!/usr/bin/env bash
# GPU checks in one go, for a machine with a CUDA GPU and bonecluster installed (pip install -e .[test]).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR] [SHARED_DATA_DIR]
#
# 0. issue 25, first: the GPU's name (OUT_DIR/gpu.txt), one `paper`-preset epoch (ResNet-50, 224 px)
#    on 36,000 phantoms against the floor (benchmarks/bench_epoch.py; the bar: <= 60 s and >= 0.8 of
#    the floor on an H100), then on 8,000 phantoms the preset as it is and with each speed switch
#    flipped (channels-last off, mixed precision off, torch.compile on); with two or more GPUs, the
#    same 8,000-phantom training under torchrun on all of them against one (scaling efficiency);
# 1. the CUDA tests alone (tests/integration/test_cuda.py), the bfloat16 weight-gradient check on CUDA
#    (benchmarks/bench_bf16_conv_grad.py; wrong over 1-px maps on our CPU), then the whole suite on CUDA
#    (train.device=auto picks it; the viewer's browser test is left out);
# 2. training speed, engine against a plain loop (benchmarks/bench_train.py);
# 3. with SHARED_DATA_DIR (../shared/data layout): the `paper` preset on held-out real films
#    (stage 1, 50 epochs) and stage 2 on humerus studies with three trained seed networks (the `cpu`
#    preset's stage 2 before 2026-12-06, whose figures RESULTS.md holds);
#    and the three-way stage-1 suite (benchmarks/bench_real_suite.py) from phantom weights
#    pre-trained on 100,000 phantoms, with 50 SimCLR epochs.
# Each step has its own time cap and log under OUT_DIR (default gpu-check); a failing step does not
# stop the next. Written after the first H100 session (docs/BENCHMARKS.md, "Training speed").
set -u
OUT=${1:-gpu-check}
DATA=${2:-}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA GPU visible to $PY; nothing to check" >&2
  exit 2
fi
export PYTHONUNBUFFERED=1
N=$(( $(nproc) > 16 ? 14 : $(nproc) - 2 ))
XDIST=$($PY -c "import xdist" 2>/dev/null && echo "-n $N")
step() {  # name, seconds, command...
  local name=$1 t=$2; shift 2
  echo "== $name (cap ${t}s)"
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1
  echo "   rc=$? $(tail -n 1 "$OUT/$name.log")"
}
nvidia-smi -L > "$OUT/gpu.txt" 2>&1; cat "$OUT/gpu.txt"
EPOCH_WORK="$OUT/epoch-phantoms"
step epoch-paper-36000 480 $PY benchmarks/bench_epoch.py --preset paper --n 36000 --size 224 --set train.workers=8 \
  --work "$EPOCH_WORK" --json "$OUT/epoch_paper_36000.json"
for switch in "" model.channels_last=false train.amp=false train.compile=true; do
  name=epoch-paper-8000${switch:+-${switch//[.=]/-}}
  step "$name" 240 $PY benchmarks/bench_epoch.py --preset paper --n 8000 --size 224 --set train.workers=8 \
    ${switch:+--set $switch} --work "$EPOCH_WORK" --json "$OUT/$name.json"
done
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())")   # what CUDA sees (CUDA_VISIBLE_DEVICES, MIG)
if [ "$GPUS" -ge 2 ]; then   # the 8,000-phantom training on one GPU and on all of them
  for procs in 1 "$GPUS"; do
    OMP_NUM_THREADS=4 step "ddp-$procs" 300 $PY -m torch.distributed.run --standalone --nproc_per_node "$procs" \
      -m bonecluster train "$EPOCH_WORK/phantoms-n8000-s224-seed0" --out "$OUT/ddp-$procs" --stages 1 \
      --preset paper --quiet --set train.epochs=2 --set train.workers=4
    # images_per_s counts rank 0's share: multiply by the processes for the total
    echo "   $procs process(es), images_per_s per GPU:"; head -n 1 "$OUT/ddp-$procs/stage1/metrics.csv"
    tail -n 1 "$OUT/ddp-$procs/stage1/metrics.csv"
  done
fi
step cuda-tests 300 $PY -m pytest -q -p no:cacheprovider tests/integration/test_cuda.py
# bfloat16 weight gradients over 1-px maps: wrong on a CPU (docs/RELIABILITY.md); is CUDA's right?
step bf16-conv-grad 120 $PY benchmarks/bench_bf16_conv_grad.py --device cuda --json "$OUT/bf16_conv_grad_cuda.json"
OMP_NUM_THREADS=1 step suite 600 $PY -m pytest -q -p no:cacheprovider $XDIST tests \
  --ignore=tests/integration/test_browser.py
OMP_NUM_THREADS=8 step bench-train 150 $PY benchmarks/bench_train.py --json "$OUT/bench_train.json"
if [ -n "$DATA" ]; then
  step real-paper 900 $PY benchmarks/bench_real.py --split "$DATA/fracture-parts/manifest.csv" --holdout 0.3 \
    --train "$DATA/mura-humerus-64" --stages 1 --preset paper --set train.epochs=50 \
    --work "$OUT/real-paper" --json "$OUT/real_paper.json"
  step real-humerus 600 $PY benchmarks/bench_real.py --split "$DATA/mura-humerus-64" --holdout 0.3 --stages 2 \
    --set stage2.weights=same --set stage2.epochs=10 --set stage2.networks=3 --work "$OUT/real-humerus" --json "$OUT/real_humerus.json"
  step real-suite-phantoms 900 $PY benchmarks/bench_real_suite.py --data "$DATA" --preset cpu-real \
    --set model.weights=phantoms --set phantoms.films=100000 --set selfsup.epochs=50 --set selfsup.batch_size=256 \
    --work "$OUT/real-suite" --json "$OUT/real_suite.json" --quiet
fi
echo "logs in $OUT"
