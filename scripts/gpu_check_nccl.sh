#!/usr/bin/env bash
# One-GPU check of the NCCL backend (needs an NVIDIA GPU, its driver and NCCL; no Python packages).
#   (a) trains the Shakespeare example a few steps with backend local and with backend nccl as a
#       1-rank torchrun-style launch (env vars set by hand), and compares the losses of the two
#       metrics.jsonl files: with one rank every NCCL collective is a copy, so they must be identical;
#   (b) prints the NCCL version found (FAST_LLM_NCCL_LIB overrides the search);
#   (c) starts rank 0 of a 2-rank launch whose rank 1 never comes: it must stop with an error within
#       model.distributed.timeout (5 s here), not hang;
#   (d) overlap, with the CUDA engine: 1-rank NCCL runs with use_cuda, ZeRO-3, 2 weight buffers vs 1
#       (prefetch vs none): prints the mean step time and share of the step waiting on communication of
#       each (figures, no pass/fail; the collectives run on NCCL's own stream).
# Usage: cargo build --release && scripts/gpu_check_nccl.sh   (STEPS=6 by default)
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=target/release/fast-llm-rs
[ -x "$BIN" ] || { echo "FAIL: $BIN missing; run cargo build --release"; exit 2; }
STEPS=${STEPS:-6}
WORK=$(mktemp -d)
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null \
  || echo $((20000 + RANDOM % 20000)); }
ARGS=(--config examples/shakespeare.yaml "training.train_iters=$STEPS" training.logs.interval=1
      model.distributed.world_size=1 training.checkpoint.interval=1000)
unset RANK WORLD_SIZE LOCAL_RANK SLURM_PROCID OMPI_COMM_WORLD_RANK
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true

echo "== (a) local backend, 1 rank"
"$BIN" train "${ARGS[@]}" "run.experiment_dir=$WORK/local" model.distributed.backend=local >"$WORK/local.log" 2>&1 \
  || { tail -5 "$WORK/local.log"; echo "FAIL: local run"; exit 1; }
echo "== (a) nccl backend, 1 rank (RANK=0 WORLD_SIZE=1 LOCAL_RANK=0)"
RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=$(port) \
  "$BIN" train "${ARGS[@]}" "run.experiment_dir=$WORK/nccl" model.distributed.backend=nccl >"$WORK/nccl.log" 2>&1
rc=$?
grep -E "^(NCCL|Rank 0|Distributed)" "$WORK/nccl.log"
[ $rc -eq 0 ] || { tail -5 "$WORK/nccl.log"; echo "FAIL: nccl run (exit $rc)"; exit 1; }
# Metric records start with phase, step and loss (struct order).
losses() { sed -E 's/^\{("phase":"[a-z]+","step":[0-9]+,"loss":[^,}]+).*/\1/' "$1/metrics.jsonl"; }
losses "$WORK/local" >"$WORK/local.losses"; losses "$WORK/nccl" >"$WORK/nccl.losses"
paste -d'|' "$WORK/local.losses" "$WORK/nccl.losses"
if [ -s "$WORK/local.losses" ] && diff -q "$WORK/local.losses" "$WORK/nccl.losses" >/dev/null; then
  echo "PASS (a): $(wc -l <"$WORK/local.losses") identical loss records"
else
  echo "FAIL (a): losses differ"; A=1
fi

echo "== (b) NCCL version"
grep -E "^NCCL " "$WORK/nccl.log" || { echo "FAIL (b): no NCCL version line"; B=1; }

echo "== (c) rank 1 never starts: rank 0 must stop within the timeout"
start=$(date +%s)
RANK=0 WORLD_SIZE=2 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=$(port) timeout 60 \
  "$BIN" train "${ARGS[@]}" "run.experiment_dir=$WORK/fault" model.distributed.backend=nccl \
  model.distributed.world_size=2 model.distributed.timeout=5 >"$WORK/fault.log" 2>&1
rc=$?; took=$(( $(date +%s) - start ))
tail -1 "$WORK/fault.log"
if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $took -lt 30 ]; then echo "PASS (c): exit $rc after ${took}s"
else echo "FAIL (c): exit $rc after ${took}s"; C=1; fi
echo "== (d) overlap: use_cuda, ZeRO-3, 2 weight buffers vs 1 (mean over steps after the first)"
for wb in 2 1; do
  RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=$(port) timeout 120 \
    "$BIN" train "${ARGS[@]}" "run.experiment_dir=$WORK/overlap$wb" model.distributed.backend=nccl \
    model.distributed.use_cuda=true model.multi_stage.zero_stage=3 model.multi_stage.num_weight_buffers=$wb \
    >"$WORK/overlap$wb.log" 2>&1 || { tail -3 "$WORK/overlap$wb.log"; echo "(d) weight buffers $wb: run failed"; continue; }
  python3 - "$WORK/overlap$wb/metrics.jsonl" "$wb" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"training"' in l][1:]
if rows:
    t = sum(r["step_time_s"] for r in rows) / len(rows)
    w = sum(r["comm_wait_s"] for r in rows) / len(rows)
    print(f"(d) weight buffers {sys.argv[2]}: mean step {t:.4f} s, waiting on communication {w:.4f} s "
          f"({100 * w / t:.1f}%) over {len(rows)} steps")
PY
done
echo "logs in $WORK"
[ -z "${A:-}${B:-}${C:-}" ]
