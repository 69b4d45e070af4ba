#!/usr/bin/env bash
# One H200 call: SmolLM2 task quality of every method at 4K/8K, extrapolation past the
# trained 8K, a real attention trace and the attention-level report on it.
# Usage (on the GPU machine, repo root): bash bench/gpu_quality.sh GGUF_PATH
# Writes JSON and markdown under $OUT (default bench/results).
set -u
G=${1:?path to the SmolLM2 GGUF}
O=${OUT:-bench/results}
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
ev() { python3 -m kvloft.cli eval --model "$G" --device cuda --no-progress "$@"; }

timeout 300 ev --tasks passkey,niah_single_number,niah_multikey,vt --lengths 4k,8k \
  --methods dense,exact,attention_graph,tokenselect,recycled,hip,actqkv --budget 1024 --samples 2 \
  --name h200-4k-8k --out "$O/quality_h200_4k8k.json" --doc "$O/quality_h200.md" \
  --note "H200, bf16, Triton kernels; 2 samples per cell" 2>&1 | tail -4
timeout 150 ev --tasks passkey,niah_single_number --lengths 16k,32k --methods dense,exact+x,tokenselect+x \
  --budget 1024 --samples 2 --name h200-extrapolation --out "$O/quality_h200_extrap.json" \
  --doc "$O/quality_h200.md" --note "H200; +x = remapped positions (trained length 8K)" 2>&1 | tail -4
timeout 60 python3 -m kvloft.eval.traces --model "$G" --length 8k --task niah_single_number --haystack essay \
  --layers 0,7,15,23,29 --generate 32 --device cuda --out /tmp/trace_8k.safetensors 2>&1 | tail -2
timeout 150 python3 -m kvloft.eval.attention_report --trace /tmp/trace_8k.safetensors \
  --methods exact,attention_graph,tokenselect,recycled,hip,actqkv --budget 256,1024 --steps 32 \
  --out "$O/attention_report_h200.json" --doc "$O/attention_report_h200.md" 2>&1 | tail -12
