#!/usr/bin/env bash
# One device call for the decode engine's open figures: prefill against HF transformers (SDPA) on
# the Qwen2.5-0.5B shape at 8K/30K with a profile of the 30K prefill; batch 8 x 128K (Llama-3-8B
# shape, hip keys_on=host, fp8 host tier, int4 weights so 8 sessions fit 24 GiB) against batch 1 in
# the same configuration; exact and tokenselect against dense at 128K; hip against hip:rank=z and
# hip:scan_stages=1/2 (every row of stages 2-3 scored) at 32K through the engine. JSON and text under $OUT, packed into one archive.
# Usage (GPU machine, repo root):  TOTAL=540 bash bench/gpu_s23b.sh
set -u
DEFAULT_TOTAL=540 . bench/gpu_budget.sh
timeout "$(left 90)" python3 bench/prefill_speed.py --lengths 8k,30k --chunks 16384,auto --methods dense,exact \
  --repeats 3 --out "$O" > "$O/prefill_speed.txt" 2>&1; tail -8 "$O/prefill_speed.txt"
timeout "$(left 60)" python3 bench/prefill_speed.py --profile dense:auto:30k > "$O/prefill_profile.txt" 2>&1
head -c 3000 "$O/prefill_profile.txt" | tail -c 2500
for b in 1 8; do
  timeout "$(left 130)" python3 bench/decode.py --presets llama3-8b --contexts 128k --methods hip:keys_on=host@engine \
    --weights int4 --host-dtype fp8 --batch $b --steps 16 --host-memory 120GiB --tag b$b-128k-fp8 --out "$O" 2>&1 | grep -v '^{' | tail -3
done
timeout "$(left 150)" python3 bench/decode.py --presets llama3-8b --contexts 128k \
  --methods dense,exact:keys_on=device@wholegraph,tokenselect --steps 16 --host-memory 100GiB --tag ratio-128k --out "$O" 2>&1 | grep -v '^{' | tail -5
timeout "$(left 80)" python3 bench/decode.py --presets llama3-8b --contexts 32k \
  --methods hip:keys_on=host@engine,hip:keys_on=host:rank=z@engine,hip:keys_on=host:scan_stages=1/2@engine --steps 16 --host-memory 100GiB \
  --tag z32k-b1 --out "$O" 2>&1 | grep -v '^{' | tail -3
(cd "$O" && tar czf s23b.tgz ./*.json ./*.md ./*.txt 2>/dev/null && find . -maxdepth 1 -type f ! -name s23b.tgz -delete)
ls "$O"
