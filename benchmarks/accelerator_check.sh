#!/usr/bin/env bash
# One-command accelerator check: tests, attack and train-step throughput against PyTorch on the
# same GPU, and the Fashion-MNIST AdCorDA config end to end. Writes results.json + report.md.
#
#   benchmarks/accelerator_check.sh [OUT_DIR]          # on the GPU machine (about 9 minutes)
#   benchmarks/accelerator_check.sh --dry-run [OUT_DIR] # here, on the CPU: tiny sizes, same steps
#
# OUT_DIR defaults to $ACCEL_CHECK_OUT, then $OUT, then runs/accelerator_check. Nothing is
# fetched: packages the machine's image lacks are installed from ./.whl (prepare them with
# benchmarks/accelerator_wheels.sh, which also copies the Fashion-MNIST IDX files to
# ./.data/fashion-mnist). Environment: PYTHON (default python3: the image's Python with JAX and
# torch), TORCH_PYTHON (default $PYTHON; the dry run here uses a separate torch venv), and
# per-part time limits ACCEL_TESTS_S, ACCEL_ATTACK_S, ACCEL_LAUNCHES_S, ACCEL_TRAIN_S,
# ACCEL_ADCORDA_S. A part that fails or runs out of time is recorded as such and the next one
# still runs. ACCEL_CHECK_PACK=1 leaves only results.json, report.md and raw.tar.gz (all logs).
# On this workplace's lent GPU (the `device` tool; carry .whl and .data):
#   ACCEL_CHECK_PACK=1 benchmarks/accelerator_check.sh "$OUT"
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
[ "${ACCEL_CHECK_DRY_RUN:-0}" = 1 ] && DRY_RUN=1
OUT_DIR=${1:-${ACCEL_CHECK_OUT:-${OUT:-runs/accelerator_check}}}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
PYTHON=${PYTHON:-python3}
TORCH_PYTHON=${TORCH_PYTHON:-$PYTHON}
export PYTHONUNBUFFERED=1
WORK=$(mktemp -d "${TMPDIR:-/tmp}/accel_check.XXXXXX")
PARTS="$OUT_DIR/parts.jsonl"
: > "$PARTS"

if [ "$DRY_RUN" = 1 ]; then
  # Same steps, sizes that finish in minutes on 2 CPU cores.
  ATTACK_CASES="small_cnn/28x28x1/10/16,resnet20/32x32x3/100/8"
  TORCH_ATTACK_BATCHES="small_cnn=16;resnet20=8"
  ATTACK_IMPLEMENTATIONS=autodiff,adcorda
  TRAIN_CASES="small_cnn/28x28x1/10/16,resnet20/32x32x3/10/16"
  TRAIN_BATCH=16
  REPEATS=1
  TEST_SELECTION=(tests/test_export_platforms.py -k "names or callbacks")
  ADCORDA_OVERRIDES=(--config.data.max_train_examples=2000 --config.train.epochs=1
                     --config.evaluate.max_examples=100 --config.adapt.epochs=1
                     --config.evaluate.apgd.steps=10 --config.evaluate.eps="(0.01,)")
  : "${ACCEL_TESTS_S:=300}" "${ACCEL_ATTACK_S:=900}" "${ACCEL_TRAIN_S:=900}" "${ACCEL_ADCORDA_S:=900}"
  : "${ACCEL_LAUNCHES_S:=300}"
  TORCH_VARIANTS_ATTACK=torchattacks
  TORCH_VARIANTS_TRAIN=channels_last,amp_channels_last
else
  ATTACK_CASES="small_cnn/28x28x1/10/512,small_cnn/28x28x1/10/4096,resnet20/32x32x3/100/256,resnet20/32x32x3/100/2048"
  TORCH_ATTACK_BATCHES="small_cnn=512,4096;resnet20=256,2048"
  ATTACK_IMPLEMENTATIONS=adcorda  # On a GPU the library's path is the plain one: no second row.
  TRAIN_CASES="small_cnn/28x28x1/10/128,resnet20/32x32x3/10/128"
  TRAIN_BATCH=128
  REPEATS=5
  # Every test that does not need the native CPU kernel (those skip themselves without it).
  TEST_SELECTION=(-m "not slow")
  ADCORDA_OVERRIDES=()
  # About 9 minutes in all: each part stops at its limit (set-up and report add ~30 s).
  : "${ACCEL_TESTS_S:=60}" "${ACCEL_ATTACK_S:=200}" "${ACCEL_TRAIN_S:=100}" "${ACCEL_ADCORDA_S:=120}"
  : "${ACCEL_LAUNCHES_S:=40}"
  TORCH_VARIANTS_ATTACK=torchattacks,compile
  TORCH_VARIANTS_TRAIN=channels_last,amp_channels_last
fi

log() { echo "[accelerator_check $(date +%H:%M:%S)] $*"; }

# part NAME LIMIT_S COMMAND...: runs COMMAND under a time limit, logs to OUT_DIR/NAME.log and
# records {"part", "rc", "seconds", "timed_out"} in parts.jsonl.
part() {
  local name=$1 limit=$2; shift 2
  log "$name (limit ${limit}s): $*"
  local start end rc
  start=$(date +%s.%N)
  timeout --signal=INT --kill-after=15 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  rc=$?
  end=$(date +%s.%N)
  local seconds
  seconds=$(awk "BEGIN {printf \"%.1f\", $end - $start}")
  local timed_out=false
  { [ $rc = 124 ] || [ $rc = 137 ]; } && timed_out=true
  echo "{\"part\": \"$name\", \"rc\": $rc, \"seconds\": $seconds, \"timed_out\": $timed_out}" >> "$PARTS"
  log "$name: rc=$rc in ${seconds}s"
  tail -n 3 "$OUT_DIR/$name.log"
}

# -- 0. Set-up: carried wheels, the project itself (no downloads, the image's JAX kept).
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
  log "installing carried wheels from .whl into $WORK/site"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$WORK/site" .whl/*.whl \
    || { log "warning: not every carried wheel fits this Python; installing the pure-Python ones"
         "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
             --upgrade --target "$WORK/site" .whl/*-none-any.whl; }
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
FASHION_DIR=""
for dir in .data/fashion-mnist /usr/share/datasets/fashion-mnist; do
  [ -d "$dir" ] && FASHION_DIR=$(cd "$dir" && pwd) && break
done
ACCEL_ENV_JSON="$OUT_DIR/environment.json" part environment 60 "$PYTHON" - <<'EOF'
import json, os, platform, jax
record = {"python": platform.python_version(), "jax": jax.__version__,
          "backend": jax.default_backend(), "device": str(jax.devices()[0])}
with open(os.environ["ACCEL_ENV_JSON"], "w") as f:
  json.dump(record, f)
print(json.dumps(record))
import adcorda_jax, flax, optax, orbax.checkpoint, ml_collections  # noqa: E401
print("adcorda_jax imports; flax", flax.__version__, "optax", optax.__version__)
EOF

# -- 1. The test suite on the accelerator (a per-test limit where pytest-timeout is installed).
PER_TEST_LIMIT=()
"$PYTHON" -c "import pytest_timeout" 2>/dev/null && PER_TEST_LIMIT=(--timeout=60)
part tests "$ACCEL_TESTS_S" "$PYTHON" -m pytest -q -p no:cacheprovider "${PER_TEST_LIMIT[@]}" \
    "${TEST_SELECTION[@]}" --junitxml="$OUT_DIR/tests.xml"

# -- 2. PGD throughput: the library's attack path vs torchattacks and torch.compile, same GPU.
part attack_jax "$((ACCEL_ATTACK_S * 2 / 5))" "$PYTHON" main.py \
    --config configs/benchmark_attack.py --workdir "$WORK/benchmark_attack" \
    --config.cpu_devices=0 --config.benchmark.cases="$ATTACK_CASES" \
    --config.benchmark.implementations="$ATTACK_IMPLEMENTATIONS" --config.benchmark.devices="(1,)" \
    --config.benchmark.repeats="$REPEATS"
cp "$WORK/benchmark_attack/results.json" "$OUT_DIR/attack_jax.json" 2>/dev/null
part attack_torch "$((ACCEL_ATTACK_S * 3 / 5))" "$TORCH_PYTHON" benchmarks/torch_pgd_reference.py \
    --device auto --variants "$TORCH_VARIANTS_ATTACK" --batches "$TORCH_ATTACK_BATCHES" \
    --repeats "$REPEATS" --keep-going --json "$OUT_DIR/attack_torch.json"
part attack_launches "$ACCEL_LAUNCHES_S" "$PYTHON" benchmarks/attack_launches.py \
    --json "$OUT_DIR/attack_launches.json" $([ "$DRY_RUN" = 1 ] && echo --batch 8)

# -- 3. Train-step throughput, float32 and bfloat16, vs PyTorch (channels_last, AMP, compile).
part train_jax "$((ACCEL_TRAIN_S * 3 / 5))" "$PYTHON" main.py \
    --config configs/benchmark_train.py --workdir "$WORK/benchmark_train" \
    --config.benchmark.cases="$TRAIN_CASES" --config.benchmark.implementations=adcorda,bfloat16 \
    --config.benchmark.repeats="$REPEATS"
cp "$WORK/benchmark_train/results.json" "$OUT_DIR/train_jax.json" 2>/dev/null
part train_torch "$((ACCEL_TRAIN_S * 2 / 5))" "$TORCH_PYTHON" benchmarks/torch_train_reference.py \
    --device auto --variants "$TORCH_VARIANTS_TRAIN" --batch "$TRAIN_BATCH" \
    --repeats "$REPEATS" --keep-going --json "$OUT_DIR/train_torch.json"

# -- 4. The Fashion-MNIST AdCorDA config, one seed, end to end.
if [ -n "$FASHION_DIR" ]; then
  part adcorda_fashion_mnist "$ACCEL_ADCORDA_S" "$PYTHON" main.py \
      --config configs/adcorda_fashion_mnist.py --workdir "$WORK/adcorda_fashion_mnist" \
      --config.data.data_dir="$FASHION_DIR" --config.adcorda.seeds="(0,)" "${ADCORDA_OVERRIDES[@]}"
  cp "$WORK/adcorda_fashion_mnist/results.json" "$OUT_DIR/adcorda_fashion_mnist.json" 2>/dev/null
else
  log "no Fashion-MNIST IDX files (.data/fashion-mnist): skipping the AdCorDA run"
  echo '{"part": "adcorda_fashion_mnist", "rc": null, "seconds": 0, "timed_out": false, "skipped": "no data"}' >> "$PARTS"
fi

# -- Report.
"$PYTHON" benchmarks/accelerator_report.py "$OUT_DIR" --dry-run "$DRY_RUN"
# Every part's log and raw records in one archive as well; ACCEL_CHECK_PACK=1 then keeps only
# results.json, report.md and raw.tar.gz (for a remote machine that returns few files).
(cd "$OUT_DIR" && tar -czf raw.tar.gz --exclude=raw.tar.gz --exclude=results.json \
    --exclude=report.md -- *) \
  && if [ "${ACCEL_CHECK_PACK:-0}" = 1 ]; then
       find "$OUT_DIR" -mindepth 1 -maxdepth 1 ! -name raw.tar.gz ! -name results.json \
           ! -name report.md -exec rm -rf {} +
     fi
log "wrote $OUT_DIR/results.json, $OUT_DIR/report.md and $OUT_DIR/raw.tar.gz"
rm -rf "$WORK"
