#!/usr/bin/env bash
# The one prepared check for a machine with a GPU, in one call of under 10 minutes:
#   1. the test suite, with CUDA visible (the CUDA tests run instead of being skipped);
#   2. benchmarks/throughput.py at batch 128, 1024 and 8192, with and without --amp/--compile;
#   3. one training epoch and a test through main.py, on 10,000 images of CIFAR-10's shape;
# then a summary. Everything it writes goes to $OUT (default /tmp/device_check).
#
#   bash benchmarks/device_check.sh                 # on the GPU machine (--device=cuda)
#   DEVICE=cpu BATCHES=128 bash benchmarks/device_check.sh   # try it here first
#
# The GPU machine reaches no package registry and gets at most 64 MiB of files, so the data is
# made on the spot: CIFAR-10's shape, uint8, in torchvision's layout (random pixels unless
# $DATA_DIR points at a real copy). Figures of that epoch are a speed check, not a result.
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=${DEVICE:-cuda}
OUT=${OUT:-/tmp/device_check}
PYTHON=${PYTHON:-python3}
BATCHES=${BATCHES:-128 1024 8192}
SECONDS_PER_RATE=${SECONDS_PER_RATE:-3}
TESTS=${TESTS:-1}  # 0 skips step 1
TEST_TIMEOUT=${TEST_TIMEOUT:-200}
RUN_TIMEOUT=${RUN_TIMEOUT:-120}
mkdir -p "$OUT"
summary="$OUT/summary.txt"
: > "$summary"
say() { echo "$*" | tee -a "$summary"; }

say "device_check: device=$DEVICE python=$($PYTHON -c 'import sys; print(sys.version.split()[0])')"
$PYTHON -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
    torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")' 2>&1 | tee -a "$summary"

# 1. tests (CUDA visible; pytest's last line is the count)
if [ "$TESTS" = 1 ]; then
  start=$SECONDS
  timeout "$TEST_TIMEOUT" $PYTHON -m pytest -q -x -p no:cacheprovider tests > "$OUT/tests.log" 2>&1
  say "tests (exit $?, $((SECONDS - start)) s): $(tail -n 1 "$OUT/tests.log")"
fi

# 2. throughput sweep: one JSON line per configuration
: > "$OUT/throughput.jsonl"
for batch in $BATCHES; do
  for amp in false true; do
    for compile in false true; do
      line=$(timeout "$RUN_TIMEOUT" $PYTHON benchmarks/throughput.py --device="$DEVICE" \
             --batch_size="$batch" --amp="$amp" --compile="$compile" \
             --seconds="$SECONDS_PER_RATE" 2> "$OUT/throughput_err.log" | tail -n 1)
      code=$?
      if [ $code -eq 0 ] && [ -n "$line" ]; then
        echo "$line" >> "$OUT/throughput.jsonl"
        say "throughput batch=$batch amp=$amp compile=$compile: $($PYTHON -c '
import json, sys
r = json.loads(sys.argv[1])
print("train %.0f img/s (%s GFLOP/s), eval %.0f img/s, sensor %.0f img/s" % (
    r["train_images_per_s"], r["train_gflop_per_s"], r["eval_images_per_s"],
    r["sensor_images_per_s"]))
' "$line")"
      else
        say "throughput batch=$batch amp=$amp compile=$compile: failed (exit $code): $(tail -n 1 "$OUT/throughput_err.log")"
      fi
    done
  done
done

# 3. one epoch and a test on 10,000 images of CIFAR-10's shape
data=${DATA_DIR:-$OUT/data}
if [ -z "${DATA_DIR:-}" ]; then
  $PYTHON - "$data" <<'EOF'
import sys
sys.path.insert(0, "tests")
from conftest import write_tiny_cifar  # the tests' writer of torchvision's layout
write_tiny_cifar(sys.argv[1], per_batch=2000, num_test=1000)
EOF
fi
common=(--device="$DEVICE" --data_dir="$data" --ckpt_dir="$OUT/ckpt" --plot_dir="$OUT/plots")
# This script's own run folders: a second check must not meet the first one's run (main.py
# refuses to train over another run's checkpoints, and the test would read the old one).
rm -rf "$OUT/ckpt" "$OUT/plots"
# The line a step's log ends with: its figures when it worked, its error when it did not.
outcome() { tr '\r' '\n' < "$1" | grep -a "$2" | tail -n 1 | grep . || tail -n 1 "$1"; }
start=$SECONDS
timeout "$RUN_TIMEOUT" $PYTHON main.py "${common[@]}" --epochs=1 > "$OUT/train.log" 2>&1
say "train 1 epoch (exit $?, $((SECONDS - start)) s): $(outcome "$OUT/train.log" '^epoch 1/')"
start=$SECONDS
timeout "$RUN_TIMEOUT" $PYTHON main.py "${common[@]}" --is_train=False --model_epoch=1 \
  > "$OUT/test.log" 2>&1
say "test (exit $?, $((SECONDS - start)) s): $(outcome "$OUT/test.log" '^test ')"
echo "done; logs in $OUT"
