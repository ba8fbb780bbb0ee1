#!/usr/bin/env bash
# Decode latency on one GPU, bf16: GPT-L against StagFormer 2 x L/2 (separate weights as one
# stacked step, shared weights batched, recurrent), batch 1 and 8, context 1k and 4k, at ~1B
# parameters (hidden 2048, L = 24) and ~350M (hidden 1024, L = 24). Megatron-free: the reference
# engine (ReferenceDecoder), so the GPU machine needs torch alone. About 8 minutes on an H200.
#
#     bash bench/gpu/decode_gpu.sh [OUT_DIR]          # default bench/results
#     SMOKE=1 bash bench/gpu/decode_gpu.sh /tmp/smoke  # the same commands, tiny, on the CPU
#
# Writes decode_gpu_{350m,1b,1b_compiled}.json and .png to OUT_DIR and prints the tables.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-bench/results}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
variants=(gpt-L gpt-L/2 stag-sep-seq stag-sep-bat stag-shared-bat stag-recurrent)
if [[ ${SMOKE:-0} == 1 ]]; then  # tiny shapes, few steps, eager / compile on the CPU
  common=(--engine reference --device cpu --dtypes bf16 --steps 4 --warmup 2 --repeats 1)
  mid=(--size tiny --batch-sizes 1 --contexts 48 --backends eager)
  big=(--size tiny --batch-sizes 1 2 --contexts 48 96 --backends eager)
  compiled=(--size tiny --batch-sizes 1 --contexts 48 --backends compile)
else
  common=(--engine reference --device cuda --dtypes bf16 --steps 64 --warmup 8 --repeats 3)
  mid=(--size 350m --batch-sizes 1 8 --contexts 1024 4096 --backends graph)
  big=(--size 1b --batch-sizes 1 8 --contexts 1024 4096 --backends eager graph)
  compiled=(--size 1b --batch-sizes 1 --contexts 1024 --backends compile+graph)
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
"$python" bench/decode_latency.py "${common[@]}" "${mid[@]}" --variants "${variants[@]}" \
  --out "$out/decode_gpu_350m.json" --plot "$out/decode_gpu_350m.png"
"$python" bench/decode_latency.py "${common[@]}" "${big[@]}" --variants "${variants[@]}" \
  --out "$out/decode_gpu_1b.json" --plot "$out/decode_gpu_1b.png"
"$python" bench/decode_latency.py "${common[@]}" "${compiled[@]}" \
  --variants gpt-L stag-sep-bat stag-shared-bat --out "$out/decode_gpu_1b_compiled.json"
