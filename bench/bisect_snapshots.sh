#!/usr/bin/env bash
# Export the package and the benches of earlier commits under .bisect/NAME (ignored by git), so one
# device call can time the same row on each (bench/gpu_bisect.sh; carry [".bisect", ".whl"]).
# Usage (repository root):  bash bench/bisect_snapshots.sh NAME=COMMIT [NAME=COMMIT ...]
set -euo pipefail
rm -rf .bisect && mkdir -p .bisect
for pair in "$@"; do
  name=${pair%%=*} commit=${pair#*=}
  mkdir -p ".bisect/$name"
  git archive "$commit" kvloft bench/decode.py bench/common.py | tar -x -C ".bisect/$name"
  echo "$name $(git rev-parse --short "$commit") $(du -sh ".bisect/$name" | cut -f1)"
done
