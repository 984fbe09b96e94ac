#!/usr/bin/env bash
# Every benchmark of docs/benchmarks.md, one after the other (they need the machine to themselves).
# Logs (with a BENCH_JSON line each) go to ${OUT:-/tmp/bench}; about an hour on 2 cores.
#   bash bench/run_all.sh            # all
#   bash bench/run_all.sh infer      # one or more of: flops infer infer-s3 scaling archive train prepare
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bench}
mkdir -p "$OUT"
what=${*:-flops infer infer-s3 scaling archive train prepare}
for w in $what; do
  echo "== $w $(date -u +%H:%M:%S)"
  case $w in
    flops)    python bench/flops.py --models cpu,paper --rounds 3 --paper-rounds 1 --malloc-rounds 1 ;;
    infer)    python bench/infer_bench.py --what local --frames 1000 --small-frames 200 --variants ray,plain-cl --profile ;;
    infer-s3) python bench/infer_bench.py --what s3,paper --frames 1000 --small-frames 200 --paper-frames 12 --paper-small-frames 4 --variants ray,plain-cl ;;
    scaling)  python bench/infer_bench.py --what scaling,memory --frames 200 --small-frames 100 --variants ray,plain ;;
    archive)  python bench/infer_bench.py --what archive --frames 1000 --variants ray ;;
    train)    python bench/train_bench.py --variants ray,plain-b,plain-2b,plain-ddp --repeats 1 --epochs 3 --plain-epochs 2 --paper --profile 60 ;;
    prepare)  python bench/prepare_bench.py --quick ;;
    *) echo "unknown benchmark $w"; exit 2 ;;
  esac > "$OUT/$w.log" 2>&1
  echo "   exit $? -> $OUT/$w.log"
done
