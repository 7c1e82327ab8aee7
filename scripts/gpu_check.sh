#!/usr/bin/env bash
# The one prepared GPU check of fast-llm-rs's CUDA backend (one NVIDIA H100/H200, about 8 minutes at
# most; every step is guarded by `timeout` and by an overall deadline, GPU_CHECK_BUDGET=480 s).
#
# BUILD (on the development machine, no GPU needed), from the repository root:
#     scripts/gpu_check.sh --build
#   runs `cargo build --release --bin fast-llm-rs --example bench_gpu` and
#   `cargo test --release --lib --no-run --message-format=json` (for the exact path of the lib test
#   binary), then copies the three binaries into target/gpu-check/ and prints their sizes:
#     target/gpu-check/fast-llm-rs   the CLI (~9 MB)
#     target/gpu-check/bench_gpu     examples/bench_gpu.rs (~6 MB)
#     target/gpu-check/lib-tests     the lib's unit tests (~10 MB)
#   about 25 MB in all, well under the device tool's 64 MiB carry limit (the tracked tree is small).
#
# RUN on the GPU machine (the device tool, from the session's checkout):
#     run(command="bash scripts/gpu_check.sh", carry=["target/gpu-check"], timeout_s=560)
#   Results: stdout (section headers, PASS/FAIL lines, figures) and $OUT/gpu_check.txt (the summary),
#   with the full logs beside it ($OUT/env.txt, unit_tests.log, train_compare.log, bench_gpu.log,
#   nccl.log).
#
# STEPS
#   (a) environment: nvidia-smi, driver/CUDA versions, where libnvrtc/libcublasLt/libnccl are; exports
#       LD_LIBRARY_PATH (/usr/local/cuda/lib64 and pip's nvidia/*/lib) and FAST_LLM_RS_CUDA_INCLUDE;
#   (b) the CUDA unit tests on the real GPU: `lib-tests backend::cuda --test-threads=1` (the tests add
#       the real GPU to the emulator when a driver is present; PASS needs the "real GPU:" line);
#   (c) examples/shakespeare.yaml, 20 steps, 2 ranks, ZeRO-3: use_cuda true vs false, every step's
#       loss within 1e-4 relative;
#   (d) bench_gpu: kernels (GEMM TFLOP/s, kernel times, the attention families: mma, mma64, their
#       -recompute variants (dq without the stored ds), wmma,
#       simple, at llama-1b's and llama-125m's attention shapes), train llama-125m 20 steps, train llama-1b 10
#       steps (loss, tokens/s, MFU, memory), 2 ranks on one GPU vs 1 rank, llama-125m 10 steps with the
#       mma64 attention family;
#   (e) scripts/gpu_check_nccl.sh (the NCCL backend), if present;
#   (f) (run before (e)) 3 steps of examples/llama-1b.yaml with FAST_LLM_RS_PROFILE=1: the device time
#       by operation (kernel, matrix product shape);
#   (g) (run before (e)) the PyTorch peer baseline on this card (../shared/bench/torch_gpu_baseline.py,
#       copied into target/gpu-check by --build; eager, both models), when a Python with torch and
#       transformers is there: the issue's targets were measured on an H200, so on another card this
#       is the comparison.
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=target/gpu-check

if [ "${1:-}" = "--build" ]; then
  set -e
  cargo build --release --bin fast-llm-rs --example bench_gpu
  json=$(cargo test --release --lib --no-run --message-format=json)
  tests=$(printf '%s\n' "$json" | grep '"profile"' | grep '"test":true' | grep '"kind":\["lib"\]' \
    | sed -E 's/.*"executable":"([^"]+)".*/\1/' | tail -1)
  [ -x "$tests" ] || { echo "lib test binary not found in cargo's output"; exit 1; }
  mkdir -p "$CARRY"
  cp target/release/fast-llm-rs target/release/examples/bench_gpu "$CARRY/"
  cp "$tests" "$CARRY/lib-tests"
  # The PyTorch script that measured the issue's peer figures, for step (g) (not part of the repository).
  if [ -f ../shared/bench/torch_gpu_baseline.py ]; then cp -f ../shared/bench/torch_gpu_baseline.py "$CARRY/"
  else echo "(no ../shared/bench/torch_gpu_baseline.py: step (g) will be skipped)"; fi
  ls -la "$CARRY"
  du -cb "$CARRY"/* | tail -1 | awk '{printf "carry %s: %.1f MiB (limit 64 MiB with the tree)\n", "'"$CARRY"'", $1/1048576}'
  exit 0
fi

BUDGET=${GPU_CHECK_BUDGET:-480}
START=$(date +%s)
WORK=$(mktemp -d)
LOGS=${OUT:-$WORK}
mkdir -p "$LOGS"
SUMMARY="$LOGS/gpu_check.txt"
: >"$SUMMARY"
note() { echo "$*"; echo "$*" >>"$SUMMARY"; }
header() { echo; echo "======== $* ($(( $(date +%s) - START )) s)"; echo "== $*" >>"$SUMMARY"; }
FAILS=0
pass() { note "PASS $*"; }
fail() { note "FAIL $*"; FAILS=$((FAILS + 1)); }
# Seconds for the next step: its own limit, cut to what is left of the budget (0: skip it).
limit() {
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt 20 ]; then echo 0; elif [ "$1" -lt "$left" ]; then echo "$1"; else echo "$left"; fi
}
# guarded SECONDS LOG CMD...: runs CMD under timeout, output to stdout and LOG; returns its status.
guarded() {
  local t=$1 log=$2; shift 2
  timeout -k 10 "$t" "$@" 2>&1 | tee -a "$log"
  return "${PIPESTATUS[0]}"
}

# GPU_CHECK_EMULATOR=1: a dry run of this script on a machine without a GPU (1 to 3 minutes on 2 cores:
# the CUDA emulator for (b), (c), (d) and (f), on smaller shapes; (e), NCCL, is skipped). CI runs it, so the
# script and the binaries it drives are known to work end to end before a GPU session's one try.
C_STEPS=20
C_LIMIT=45
B_LIMIT=120
C_EXTRA=()
if [ "${GPU_CHECK_EMULATOR:-0}" = 1 ]; then
  export FAST_LLM_RS_GPU=emulator
  C_STEPS=3
  C_LIMIT=240
  B_LIMIT=300  # the emulator runs every kernel test on the CPU (about 90 s on 2 cores)
  C_EXTRA=(data.micro_batch_size=64 data.sequence_length=32)
else
  unset FAST_LLM_RS_GPU
fi

for b in fast-llm-rs bench_gpu lib-tests; do
  [ -x "$CARRY/$b" ] || { echo "FAIL: $CARRY/$b missing: run scripts/gpu_check.sh --build here and carry $CARRY"; exit 2; }
done

# ---------------------------------------------------------------- (a) environment
header "(a) environment"
{
  nvidia-smi -L
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader
  nvidia-smi | grep -m1 "CUDA Version"
  command -v nvcc >/dev/null && nvcc --version | tail -2
  echo "-- ldconfig -p"
  ldconfig -p | grep -E 'libcuda\.so|libnvrtc|libcublasLt|libnccl' || echo "(none of libcuda/libnvrtc/libcublasLt/libnccl in the ld cache)"
  echo "-- /usr/local/cuda/lib64"
  ls /usr/local/cuda/lib64 2>/dev/null | grep -E '^lib(nvrtc|cublasLt|nccl)' || echo "(no /usr/local/cuda/lib64 or no such libraries)"
} 2>&1 | tee "$LOGS/env.txt"
PIP_LIBS=""
for site in $(python3 -c 'import site, sys; print(" ".join(site.getsitepackages() + [site.getusersitepackages()]))' 2>/dev/null) \
            /opt/torch/.venv/lib/python3*/site-packages /usr/local/lib/python3*/dist-packages; do
  for d in "$site"/nvidia/*/lib; do
    [ -d "$d" ] && case ":$PIP_LIBS:" in *":$d:"*) ;; *) PIP_LIBS="$PIP_LIBS:$d" ;; esac
  done
done
PIP_LIBS=${PIP_LIBS#:}
export LD_LIBRARY_PATH="/usr/local/cuda/lib64${PIP_LIBS:+:$PIP_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
INC=/usr/local/cuda/include
if [ ! -f "$INC/cuda_bf16.h" ]; then
  for d in ${PIP_LIBS//:/ }; do [ -f "$d/../include/cuda_bf16.h" ] && INC=$(cd "$d/../include" && pwd) && break; done
fi
# Only a directory that has the header (set, it makes the NVRTC unit test required).
if [ -f "$INC/cuda_bf16.h" ]; then export FAST_LLM_RS_CUDA_INCLUDE=$INC; else unset FAST_LLM_RS_CUDA_INCLUDE; fi
unset RANK WORLD_SIZE LOCAL_RANK SLURM_PROCID OMPI_COMM_WORLD_RANK
{
  echo "-- pip nvidia lib dirs: ${PIP_LIBS:-none}"
  for d in ${PIP_LIBS//:/ }; do ls "$d" | grep -E '^lib(nvrtc|cublasLt|nccl)' | sed "s|^|   $d/|"; done
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  echo "FAST_LLM_RS_CUDA_INCLUDE=${FAST_LLM_RS_CUDA_INCLUDE:-unset} ($INC $( [ -f "$INC/cuda_bf16.h" ] && echo has || echo WITHOUT) cuda_bf16.h)"
  echo "g++ (the emulator's compiler): $(command -v g++ || echo missing)"
} 2>&1 | tee -a "$LOGS/env.txt"
grep -m1 -E "NVIDIA|GPU" "$LOGS/env.txt" >>"$SUMMARY"
grep -m1 "CUDA Version" "$LOGS/env.txt" >>"$SUMMARY"

# ---------------------------------------------------------------- (b) unit tests
header "(b) CUDA unit tests on the real GPU (lib-tests backend::cuda --test-threads=1)"
T=$(limit $B_LIMIT)
if [ "$T" -eq 0 ]; then fail "(b) skipped: out of time"; else
  # Full log in unit_tests.log; here only the GPU line, skips, failures and the result.
  timeout -k 10 "$T" "$CARRY/lib-tests" backend::cuda --test-threads=1 --nocapture >"$LOGS/unit_tests.log" 2>&1
  rc=$?
  # (--nocapture puts the tests' messages after "test NAME ... ".)
  grep -oE "(real GPU|skipped): .*|.*FAILED.*|.*panicked.*|^test result.*" "$LOGS/unit_tests.log" | sort | uniq -c | sort -rn | head -30
  grep -E "^test result" "$LOGS/unit_tests.log" | tail -1 >>"$SUMMARY"
  GPU_LINE=$(grep -v "skipped: real GPU" "$LOGS/unit_tests.log" | grep -o -m1 "real GPU: .*")
  echo "${GPU_LINE:-no real GPU line}" >>"$SUMMARY"
  grep -E " \.\.\. FAILED$" "$LOGS/unit_tests.log" >>"$SUMMARY"
  if [ "$rc" -ne 0 ]; then fail "(b) unit tests: exit $rc (124 = timeout after ${T}s)"
  elif [ -z "$GPU_LINE" ] && [ "${GPU_CHECK_EMULATOR:-0}" = 1 ]; then pass "(b) unit tests on the emulator only (dry run)"
  elif [ -z "$GPU_LINE" ]; then fail "(b) unit tests passed but the real GPU was not used (see 'skipped: real GPU' above)"
  else pass "(b) unit tests on the real GPU"; fi
  # The mma attention kernels are the default: if they disagree with the CPU here (or the attention
  # test fails otherwise, a device fault say), the rest runs the first family that was checked and
  # agreed (mma-recompute: the mma kernels without the stored ds; then wmma), else wmma (the kernels
  # benchmark still times every family).
  if grep -qE "\(mma\).*: (forward|lse|backward) error|attention_matches_cpu.*FAILED" "$LOGS/unit_tests.log"; then
    pick=wmma
    for f in mma-recompute wmma; do
      if grep -qE "\($f\) .*max relative error" "$LOGS/unit_tests.log" \
        && ! grep -qE "\($f\) .*: (forward|lse|backward) error" "$LOGS/unit_tests.log"; then pick=$f; break; fi
    done
    export FAST_LLM_RS_ATTENTION=$pick
    fail "(b) the mma attention kernels disagree with the CPU: (c), (d), (f) run FAST_LLM_RS_ATTENTION=$pick"
  fi
fi

# ---------------------------------------------------------------- (c) tiny training: GPU vs CPU
header "(c) examples/shakespeare.yaml, $C_STEPS steps, 2 ranks, ZeRO-3: use_cuda true vs false"
ARGS=(train --config examples/shakespeare.yaml "training.train_iters=$C_STEPS" model.distributed.world_size=2
      model.multi_stage.zero_stage=3 training.logs.interval=1 "training.evaluators={}"
      training.checkpoint.interval=null "${C_EXTRA[@]}")
losses() { grep '"phase":"training"' "$1/metrics.jsonl" 2>/dev/null | sed -E 's/.*"loss":([^,}]+).*/\1/'; }
ok=1
for mode in cpu gpu; do
  T=$(limit $C_LIMIT)
  [ "$T" -eq 0 ] && { ok=0; fail "(c) $mode run skipped: out of time"; break; }
  guarded "$T" "$LOGS/train_compare.log" "$CARRY/fast-llm-rs" "${ARGS[@]}" "run.experiment_dir=$WORK/$mode" \
    "model.distributed.use_cuda=$([ $mode = gpu ] && echo true || echo false)" | grep -E "^(GPU|Done|Peak|Error|error)"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { ok=0; fail "(c) $mode run: exit $rc"; tail -5 "$LOGS/train_compare.log"; }
done
if [ $ok -eq 1 ]; then
  losses "$WORK/cpu" >"$WORK/cpu.losses"; losses "$WORK/gpu" >"$WORK/gpu.losses"
  paste "$WORK/cpu.losses" "$WORK/gpu.losses" | awk -v steps="$C_STEPS" '
    { n++; r = ($1 - $2) / $1; if (r < 0) r = -r; if (r > m) m = r; if (n == 1 || n % 5 == 0) printf "step %2d cpu %.6f gpu %.6f\n", n, $1, $2 }
    END { printf "steps %d, max relative difference %.3e\n", n, m; exit !(n == steps && m < 1e-4) }' | tee -a "$SUMMARY"
  if [ "${PIPESTATUS[1]}" -eq 0 ]; then pass "(c) GPU losses match the CPU's (< 1e-4 relative)"
  else fail "(c) GPU losses differ from the CPU's (or not $C_STEPS steps)"; fi
fi

# ---------------------------------------------------------------- (d) benchmarks
bench() {  # bench LIMIT NAME ARGS...
  local t; t=$(limit "$1"); local name=$2; shift 2
  header "(d) bench_gpu $*"
  if [ "$t" -eq 0 ]; then fail "(d) $name skipped: out of time"; return 1; fi
  : >"$WORK/section.log"
  timeout -k 10 "$t" "$CARRY/bench_gpu" "$@" 2>&1 | tee -a "$WORK/section.log" "$LOGS/bench_gpu.log"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then fail "(d) $name: exit $rc (124 = timeout after ${t}s)"; return 1; fi
  return 0
}
if bench 90 kernels kernels; then
  grep -E "^(device:|qkv |mlp |vocab )" "$WORK/section.log" >>"$SUMMARY"
  grep -E "^(rms_norm|add|rotary|swiglu|embedding|cross_entropy|attention|adamw|sum_squares)" "$WORK/section.log" >>"$SUMMARY"
  if grep -q "error:" "$WORK/section.log"; then fail "(d) kernels: some kernels failed (error: lines)"; else pass "(d) kernels ran"; fi
fi
train_model() {  # train_model MODEL STEPS LIMIT
  bench "$3" "train $1" train "$1" "$2"
  local rc=$?
  # The per-step lines too: a run stopped by its timeout still leaves its tokens/s.
  grep -E "^(step |GPU memory:|plan)" "$WORK/section.log" >>"$SUMMARY"
  if [ $rc -eq 0 ]; then
    grep -E "^(---|loss:|tokens/s:|  vs|rank [0-9]+ memory|peak GPU|skipped|bf16 refused|->)" "$WORK/section.log" >>"$SUMMARY"
    if grep -q "^skipped" "$WORK/section.log"; then fail "(d) train $1: skipped (does not fit)"
    elif grep -q "went down" "$WORK/section.log"; then pass "(d) train $1: loss went down"
    else fail "(d) train $1: loss did not go down"; fi
  fi
}
# llama-1b first: it is the headline figure, and the budget cuts the last steps first.
train_model llama-1b 10 150
if bench 60 ranks ranks 4; then
  grep -E "^(1 rank|2 rank|max relative)" "$WORK/section.log" >>"$SUMMARY"
  rel=$(sed -nE 's/^max relative loss difference, 2 ranks vs 1: ([^ ]+) .*/\1/p' "$WORK/section.log")
  if awk -v r="${rel:-nan}" 'BEGIN { exit !(r + 0 == r && r < 1e-4) }'; then pass "(d) 2 ranks on one GPU match 1 rank (max rel $rel)"
  else fail "(d) 2 ranks vs 1 rank: max rel ${rel:-missing}"; fi
fi
train_model llama-125m 20 90
# The same with the 64-key attention tiles (head size 64): which family to make the default.
header "(d) llama-125m with FAST_LLM_RS_ATTENTION=mma64"
FAST_LLM_RS_ATTENTION=mma64 train_model llama-125m 10 60

# ---------------------------------------------------------------- (f) where llama-1b's step time goes
header "(f) FAST_LLM_RS_PROFILE=1 fast-llm-rs train examples/llama-1b.yaml, 3 steps"
T=$(limit 75)
if [ "$T" -eq 0 ]; then fail "(f) skipped: out of time"; else
  P_EXTRA=()
  [ "${GPU_CHECK_EMULATOR:-0}" = 1 ] && P_EXTRA=(data.micro_batch_size=128 data.sequence_length=64 model.base_model.hidden_size=64
    model.base_model.decoder.num_blocks=2 model.base_model.decoder.block.mixer.heads=2
    model.base_model.decoder.block.mixer.head_groups=2 model.base_model.decoder.block.mixer.head_size=32
    model.base_model.decoder.block.mlp.intermediate_size=96 model.base_model.embeddings.vocab_size=320)
  guarded "$T" "$LOGS/profile.log" env FAST_LLM_RS_PROFILE=1 "$CARRY/fast-llm-rs" train --config examples/llama-1b.yaml \
    training.train_iters=3 training.logs.interval=1 "training.evaluators={}" training.checkpoint.interval=null \
    "run.experiment_dir=$WORK/profile" "${P_EXTRA[@]}" | tail -26
  rc=${PIPESTATUS[0]}
  sed -n '/^Device time by operation/,$p' "$LOGS/profile.log" | head -24 >>"$SUMMARY"
  if [ "$rc" -eq 0 ]; then pass "(f) profiled llama-1b"; else fail "(f) profiled llama-1b: exit $rc"; fi
fi

# ---------------------------------------------------------------- (g) PyTorch on this card
header "(g) PyTorch peer baseline on this card (torch_gpu_baseline.py, eager)"
TORCH_PY=""
for py in /opt/torch/.venv/bin/python3 python3; do
  if command -v "$py" >/dev/null && "$py" -c 'import torch, transformers' 2>/dev/null; then TORCH_PY=$py; break; fi
done
if [ "${GPU_CHECK_EMULATOR:-0}" = 1 ]; then
  note "(g) skipped in a dry run: it needs a GPU"
elif [ ! -f "$CARRY/torch_gpu_baseline.py" ]; then
  note "(g) skipped: $CARRY/torch_gpu_baseline.py not carried"
elif [ -z "$TORCH_PY" ]; then
  note "(g) skipped: no Python with torch and transformers"
else
  T=$(limit 100)
  if [ "$T" -eq 0 ]; then fail "(g) skipped: out of time"; else
    guarded "$T" "$LOGS/torch.log" "$TORCH_PY" "$CARRY/torch_gpu_baseline.py"
    rc=$?
    grep -E '^\{|NVIDIA|nccl' "$LOGS/torch.log" >>"$SUMMARY"
    if [ "$rc" -eq 0 ]; then pass "(g) PyTorch baseline"; else fail "(g) PyTorch baseline: exit $rc (124 = timeout)"; fi
  fi
fi

# ---------------------------------------------------------------- (e) NCCL backend
header "(e) scripts/gpu_check_nccl.sh"
if [ "${GPU_CHECK_EMULATOR:-0}" = 1 ]; then
  note "(e) skipped in a dry run: the NCCL backend needs a GPU"
elif [ -f scripts/gpu_check_nccl.sh ]; then
  T=$(limit 60)
  if [ "$T" -eq 0 ]; then fail "(e) skipped: out of time"; else
    mkdir -p target/release
    [ -x target/release/fast-llm-rs ] || cp "$CARRY/fast-llm-rs" target/release/fast-llm-rs
    guarded "$T" "$LOGS/nccl.log" bash scripts/gpu_check_nccl.sh
    rc=$?
    grep -E "^(PASS|FAIL|NCCL)" "$LOGS/nccl.log" >>"$SUMMARY"
    if [ "$rc" -eq 0 ]; then pass "(e) gpu_check_nccl.sh"; else fail "(e) gpu_check_nccl.sh: exit $rc"; fi
  fi
else
  note "(e) scripts/gpu_check_nccl.sh not present: skipped"
fi

header "done: $FAILS failure(s) in $(( $(date +%s) - START )) s"
echo; echo "======== summary ($SUMMARY)"; cat "$SUMMARY"
[ "$FAILS" -eq 0 ]
