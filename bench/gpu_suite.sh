#!/usr/bin/env bash
# The GPU performance suite: the floors and workloads W1-W6 of the performance issue,
# Tessera against vLLM's numbers (and transformers' generate on W1 and W3), after the
# greedy-correctness check that must hold every time (`check`: bench/gpu_check.py's tiny
# llama and qwen3 against transformers in fp32, with CUDA graphs and eager).
#
#   bench/gpu_suite.sh [--smoke] [check] [floors] [w1] ... [w6]     (none named: all)
#
# Run from the repository root; JSON per workload and each step's log go to $OUT (default
# /tmp/gpu_suite), then one table (bench/suite_table.py). Steps are cut short to end within
# $BUDGET seconds (default 570), so that the table always prints. Model shapes come from
# bench/models/ with dummy bf16 weights and a tokenizer generated into /tmp
# (bench/make_tokenizer.py). Every step runs under `timeout`; a server started here is
# stopped on exit, whatever the exit. --smoke: tiny models on the CPU, a few prompts.
# $PYTHON picks the interpreter (default: python); $W4_RATES the request rates of W4
# (default: 4 16 inf).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
OUT=${OUT:-/tmp/gpu_suite}
PORT=${PORT:-8765}
BUDGET=${BUDGET:-570}
MODELS=/tmp/tessera-bench-models
mkdir -p "$OUT" "$MODELS"

SMOKE=0
WORK=()
for arg in "$@"; do
  case $arg in
    --smoke) SMOKE=1 ;;
    check | floors | w[1-6]) WORK+=("$arg") ;;
    *) echo "unknown workload: $arg (check, floors, w1 ... w6, --smoke)" >&2; exit 2 ;;
  esac
done
[ ${#WORK[@]} -eq 0 ] && WORK=(check floors w1 w2 w3 w4 w5 w6)

# ---- sizes: the issue's, or tiny ones for a CPU smoke run --------------------------------
if [ "$SMOKE" = 1 ]; then
  ENGINE=(--load-format dummy --dtype float32 --device cpu)
  FLOORS=(--device cpu --gemm-n 256 --copy-bytes 10000000)
  N1=4 HF_N=2 IN=24 OUT_LEN=8 N2=1 N4=4 N6=4 PREFIX=16 UNIQUE=8 LAT_IN=8 LAT_OUT=4
  ITERS=(--num-iters 1 --num-iters-warmup 1)
else
  ENGINE=(--load-format dummy --dtype bfloat16)
  FLOORS=()
  N1=1000 HF_N=64 IN=1024 OUT_LEN=128 N2=256 N4=500 N6=500 PREFIX=900 UNIQUE=124 LAT_IN=32 LAT_OUT=128
  ITERS=(--num-iters 5 --num-iters-warmup 2)
fi

# ---- helpers -------------------------------------------------------------------------------
# within SECONDS: SECONDS, or less when the budget ends sooner (0: no time left)
within() {
  local left=$((BUDGET - SECONDS - 20))
  [ "$left" -lt 30 ] && left=0
  echo $(($1 < left ? $1 : left))
}

SHOW='^\{|speedup|Successful req|Failed req|Output token thr' # the lines worth seeing live

# step NAME SECONDS CMD...: run CMD under a timeout; its full output goes to $OUT/NAME.log,
# its JSON lines to the terminal, and the log's tail when it fails.
step() {
  local name=$1 limit start=$SECONDS
  limit=$(within "$2")
  shift 2
  [ "$limit" = 0 ] && { echo "=== $name: skipped, the time budget is spent"; return 1; }
  echo "=== $name: $*"
  timeout -k 30 "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep --line-buffered -E "$SHOW"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && tail -n 25 "$OUT/$name.log"
  echo "=== $name: exit $rc after $((SECONDS - start)) s"
  return "$rc"
}

SERVER_PID=""
start_server() { # start_server LOG SERVE_ARGS...: tessera serve in the background, until /health
  local log=$1
  shift
  "$PY" -m api_server.cli serve "$@" --port "$PORT" --log-level warning >"$log" 2>&1 &
  SERVER_PID=$!
  "$PY" bench/startup.py --wait-for "$SERVER_PID" --port "$PORT" --timeout "$(within 400)" ||
    { echo "server not ready:"; tail -n 25 "$log"; return 1; }
}
stop_server() {
  [ -z "$SERVER_PID" ] && return 0
  kill -TERM "$SERVER_PID" 2>/dev/null
  for _ in $(seq 40); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.5; done
  kill -KILL "$SERVER_PID" 2>/dev/null # its engine core and workers die with it
  wait "$SERVER_PID" 2>/dev/null
  SERVER_PID=""
}
trap stop_server EXIT
trap 'exit 130' INT TERM # exit runs the EXIT trap

# ---- model folders: the shapes' configs with a generated tokenizer ------------------------
if [ "$SMOKE" = 1 ]; then
  "$PY" -c "from tests.helpers.tiny_models import make_tiny_model as m
for a in ('llama', 'qwen3'): m('$MODELS/src/tiny-' + a, a, max_position_embeddings=4096)" >/dev/null 2>&1
  BIG_SRC=$MODELS/src/tiny-llama SMALL_SRC=$MODELS/src/tiny-qwen3
else
  BIG_SRC=bench/models/llama-3.1-8b SMALL_SRC=bench/models/qwen3-0.6b
fi
BIG=$MODELS/$(basename "$BIG_SRC") SMALL=$MODELS/$(basename "$SMALL_SRC")
"$PY" bench/make_tokenizer.py "$BIG_SRC" "$BIG" >/dev/null || exit 1
"$PY" bench/make_tokenizer.py "$SMALL_SRC" "$SMALL" >/dev/null || exit 1
BIG_ARGS=(--model "$BIG" "${ENGINE[@]}" --max-model-len 2048)

# ---- the workloads -------------------------------------------------------------------------
check() { # greedy tokens equal transformers' (CUDA only: the CPU's are tests/)
  [ "$SMOKE" = 1 ] && { echo "=== check: skipped on the CPU (the test suite covers it)"; return 0; }
  step check 240 "$PY" bench/gpu_check.py --sections tiny --archs llama,qwen3
}

floors() { step floors 120 "$PY" bench/floors.py "${FLOORS[@]}" --output-json "$OUT/floors.json"; }

w1() { # offline throughput, and transformers on the first HF_N prompts
  step w1 540 "$PY" bench/throughput.py "${BIG_ARGS[@]}" --num-prompts $N1 --input-len $IN \
    --output-len $OUT_LEN --temperature 1.0 --baseline hf --baseline-num-prompts $HF_N \
    --output-json "$OUT/w1.json"
}

w2() { # nano-vllm's draw: 256 prompts, 142,827 prompt and 133,966 output tokens
  step w2 300 "$PY" bench/throughput.py --model "$SMALL" "${ENGINE[@]}" --max-model-len 4096 \
    --dataset nano-vllm --num-prompts $N2 --seed 0 --temperature 0.6 --output-json "$OUT/w2.json"
}

w3() { # latency at batch 1 and 8, and transformers' on the same batches
  step w3 400 "$PY" bench/latency.py "${BIG_ARGS[@]}" --batch-size 1 8 --input-len $LAT_IN \
    --output-len $LAT_OUT "${ITERS[@]}" --baseline hf --output-json "$OUT/w3.json"
}

w4() { # serving at request rates 4, 16 and inf
  start_server "$OUT/w4_server.log" "${BIG_ARGS[@]}" || return 1
  # A seed of its own per rate: prompts that an earlier rate left in the prefix cache
  # would skip their prefill (one server serves all three rates)
  local rate seed
  for rate in ${W4_RATES:-4 16 inf}; do
    case $rate in 4) seed=1 ;; 16) seed=2 ;; *) seed=3 ;; esac
    step "w4_rate$rate" 300 "$PY" bench/serve.py --port "$PORT" --tokenizer "$BIG" \
      --num-prompts $N4 --random-input-len $IN --random-output-len $OUT_LEN --ignore-eos \
      --request-rate $rate --seed $seed --output-json "$OUT/w4_rate$rate.json"
  done
  stop_server
}

w5() { # launch to the first 200 from /health: cold, then warm with graphs, then eager
  # An empty Triton cache of its own: the first launch compiles every kernel (vLLM's
  # "cold"), the next ones find them compiled (its "warm compile caches").
  local cache
  cache=$(mktemp -d)
  local name extra
  for name in w5_cold w5_graphs w5_eager; do
    extra=()
    [ $name = w5_eager ] && extra=(--enforce-eager)
    TRITON_CACHE_DIR=$cache step $name 420 "$PY" bench/startup.py --port "$PORT" \
      --log "$OUT/${name}_server.log" --timeout 360 --output-json "$OUT/$name.json" \
      -- "${BIG_ARGS[@]}" "${extra[@]}"
  done
  rm -rf "$cache"
}

w6() { # a shared prefix, with prefix caching on and off
  local mode
  for mode in on off; do
    local flag=--enable-prefix-caching
    [ $mode = off ] && flag=--no-enable-prefix-caching
    step "w6_$mode" 300 "$PY" bench/throughput.py "${BIG_ARGS[@]}" $flag --num-prompts $N6 \
      --prefix-len $PREFIX --input-len $UNIQUE --output-len $OUT_LEN --temperature 1.0 \
      --output-json "$OUT/w6_$mode.json"
  done
}

"$PY" -c "import torch; print('torch', torch.__version__, \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
for w in "${WORK[@]}"; do
  "$w"
done
"$PY" bench/suite_table.py "$OUT"
