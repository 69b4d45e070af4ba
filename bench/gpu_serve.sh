#!/usr/bin/env bash
# One device call: `kvloft serve` on a GGUF (the Qwen2.5-Coder-0.5B one) in bf16 with exact retrieval
# (budget 1024, sink 64, window 512, 4096-token engine steps) at 1, 8 and 32 concurrent sessions of
# 32K-token prompts, 64 answer tokens each; 16K prompts instead when the first level's timings say
# 32K would not fit. bench/serve_gpu.py runs within SECONDS, server start and stop included; its
# JSON goes to OUT_DIR and, on the device machine, to $OUT as one file (serve_gpu.json, the server's
# log tail inside). Options after SECONDS go to serve_gpu.py and override these.
# The server needs FastAPI, uvicorn and prometheus-client, the GGUF reader gguf: where they are
# missing, carry .whl (docs/serving.md, "GPU run") and they are installed into /tmp/site first.
# Usage: bash bench/gpu_serve.sh GGUF OUT_DIR SECONDS [serve_gpu.py options]
set -u
G=$1 O=$2 S=$3
shift 3
mkdir -p "$O"
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
deps() { python3 -c "import fastapi, uvicorn, prometheus_client, gguf" 2>/dev/null; }
if ! deps && [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
deps || { echo "needs fastapi, uvicorn, prometheus-client and gguf: carry .whl (docs/serving.md)"; exit 2; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# the run stops starting work at SECONDS - 35 and hangs up what still streams; the server then
# drains within seconds (at most 30 before it is killed); `timeout` is the last resort
timeout -k 5 "$S" python3 bench/serve_gpu.py --model "$G" --device cuda --sessions 1,8,32 \
  --prompt-tokens 32768,16384 --max-tokens 64 --batch1-requests 2 --method exact --budget 1024 \
  --sink 64 --window 512 --step-tokens 4096 --time-limit $(( S > 60 ? S - 35 : S / 2 )) \
  --out "$O/serve_gpu.json" "$@"
rc=$?
[ -n "${OUT:-}" ] && [ -f "$O/serve_gpu.json" ] && cp "$O/serve_gpu.json" "$OUT/serve_gpu.json"
exit $rc
