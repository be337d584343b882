#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA device (a few minutes): the CUDA-path tests, then a timed prune of
# VGG-11 (width 0.5) on the CPU and on the GPU, then the latency benchmark on the GPU (VGG-11 w0.5 and ResNet-18),
# and with 2 GPUs or more, prune and training under torchrun with nccl.
#
#   bash scripts/gpu-check.sh                 # uses .venv/bin/python if present, else python3 (or set PYTHON=...)
#   OUT=/some/folder bash scripts/gpu-check.sh   # also writes the GPU latency JSON and the logs there
#
# It needs a torch built with CUDA and mipp's dependencies (pip install -e '.[test]'); it runs mipp from src/.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" - <<'EOF'
import sys, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}")
if not torch.cuda.is_available():
    sys.exit("gpu-check: torch sees no CUDA device (a CPU-only torch, or no driver); install a CUDA build of torch")
print("device:", torch.cuda.get_device_name())
EOF

echo "== CUDA-path tests"
start=$SECONDS
tests_failed=0  # a failing test is reported at the end; the timings below still run
"$PYTHON" -m pytest tests/test_device.py tests/test_export.py -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" \
    || tests_failed=1
echo "tests: $((SECONDS - start)) s"

echo "== timed prune: VGG-11 w0.5, MIPP, 50% of MACs, 2000 calibration samples, CPU against GPU"
"$PYTHON" - <<'EOF' 2>&1 | tee "$OUT/prune.log"
import time, torch, mipp
from mipp.models import build_model

torch.manual_seed(0)
model = build_model("vgg11", width=0.5).eval()
data = torch.randn(2000, 3, 32, 32, generator=torch.Generator().manual_seed(1))
torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # same arithmetic as the CPU
plans = {}
for device in ("cpu", "cuda", "cuda"):  # the second GPU run is the warm one
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    pruned, plan = mipp.prune(model, data, budget=0.5, metric="macs", device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    plans[device] = plan
    stats = plan.stats
    print(f"{device:<4} {time.perf_counter() - start:7.2f} s  (capture {stats.get('capture_seconds', 0):.2f} s, "
          f"selection {stats.get('selection_seconds', 0):.2f} s, reconstruction "
          f"{stats.get('reconstruction_seconds', 0):.2f} s, recalibration {stats.get('recalibration_seconds', 0):.2f} s)"
          f"; {100 * stats['macs_removed']:.1f}% of MACs removed")
print("same kept units on CPU and GPU:", plans["cpu"].kept == plans["cuda"].kept)
EOF

echo "== latency on the GPU"
"$PYTHON" benchmarks/bench_latency.py --devices cuda --models vgg11@0.5,resnet18 --rounds 10 \
    --out "$OUT/latency-gpu.json" 2>&1 | tee "$OUT/latency.log"
GPUS=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -ge 2 ]; then
    echo "== torchrun with nccl on 2 GPUs: the same Plan as one GPU, fine-tuning and training with DDP"
    base="$OUT/nccl"
    rm -rf "$base"
    data=(--data synthetic --data-option input_size=28 --limit 600 --device cuda)
    "$PYTHON" -m mipp train --model lenet5 "${data[@]}" --epochs 1 --batch-size 32 --out "$base/base" --json >/dev/null
    prune=(prune --checkpoint "$base/base/model.pt" "${data[@]}" --samples 600 --budget 0.5 --metric macs)
    "$PYTHON" -m mipp "${prune[@]}" --out "$base/one" --json >/dev/null
    "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 2 -m mipp "${prune[@]}" --finetune-epochs 1 \
        --finetune-batch-size 32 --out "$base/two" --json 2>"$OUT/nccl-prune.err" | tee "$OUT/nccl.log"
    "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 2 -m mipp train --model lenet5 "${data[@]}" \
        --epochs 2 --batch-size 32 --out "$base/train" --json 2>"$OUT/nccl-train.err" | tee -a "$OUT/nccl.log"
    "$PYTHON" - "$base" <<'EOF' 2>&1 | tee -a "$OUT/nccl.log"
import json, sys
base = sys.argv[1]
one, two = (json.load(open(f"{base}/{name}/plan.json"))["kept"] for name in ("one", "two"))
print("same kept units with 1 and 2 GPUs:", one == two)
EOF
else
    echo "== torchrun with nccl: skipped ($GPUS GPU; it needs 2)"
fi
echo "gpu-check done in $SECONDS s; logs in $OUT"
[ "$tests_failed" = 0 ] || { echo "gpu-check: CUDA-path tests failed (see $OUT/tests.log)"; exit 1; }
