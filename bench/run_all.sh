#!/usr/bin/env bash
# Every benchmark of docs/benchmarks.md, one after the other (they need the machine to themselves).
# Logs (with a BENCH_JSON line each) go to ${OUT:-/tmp/bench}; about 45 minutes on 2 cores.
#   bash bench/run_all.sh            # all
#   bash bench/run_all.sh infer      # one or more of: flops infer train prepare infer-s3
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bench}
mkdir -p "$OUT"
what=${*:-flops infer train prepare infer-s3}
for w in $what; do
  echo "== $w $(date -u +%H:%M:%S)"
  case $w in
    flops)    python bench/flops.py --models cpu,paper --rounds 3 --paper-rounds 1 --malloc-rounds 1 ;;
    infer)    python bench/infer_bench.py --what local,memory,scaling --frames 200 --small-frames 40 --variants ray,ray-1thread,plain,plain-cl ;;
    infer-s3) python bench/infer_bench.py --what s3,paper --frames 150 --small-frames 30 --paper-frames 12 --paper-small-frames 4 --variants ray,plain-cl ;;
    train)    python bench/train_bench.py --quick --paper ;;
    prepare)  python bench/prepare_bench.py --quick ;;
    *) echo "unknown benchmark $w"; exit 2 ;;
  esac > "$OUT/$w.log" 2>&1
  echo "   exit $? -> $OUT/$w.log"
done
