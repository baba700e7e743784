#!/usr/bin/env bash
# The GPU run inside the device sandbox (no internet): carried wheels, GPU tests, the studies.
#   bash scripts/gpu_run.sh tests            # pytest -m gpu
#   bash scripts/gpu_run.sh studies [args]   # attention-proto run [args] --out /tmp/ap --results $OUT/results
#   AP_KB=kb.sqlite bash scripts/gpu_run.sh studies --resume RUN_ID --study X   # continue one run
# Everything written under $OUT is packed into $OUT/results.tgz (the sandbox returns at most 8 files).
# The device copy of the tree has no .git: pass the commit in, e.g.
#   ATTENTION_PROTO_COMMIT=<hash from the local checkout> bash scripts/gpu_run.sh studies
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=src:/tmp/site
fi
OUT="${OUT:-/tmp/ap-out}"
mkdir -p "$OUT"
what="${1:-studies}"; shift || true
case "$what" in
  tests)
    python3 -m pytest -q -m gpu -x -p no:cacheprovider "$@" 2>&1 | tee "$OUT/gpu_tests.log" | tail -40 ;;
  studies)
    # AP_KB=path/to/attention_proto.sqlite continues a KB brought from an earlier command (with --resume RUN_ID)
    mkdir -p /tmp/ap
    if [ -n "${AP_KB:-}" ] && [ -f "$AP_KB" ]; then cp "$AP_KB" /tmp/ap/attention_proto.sqlite; fi
    # stop in time to bring the KB back: rows are committed as they are measured, so a study cut
    # short keeps what it measured; `attention-proto analyze` and `report` finish the job off the GPU
    timeout --signal=INT "${AP_BUDGET_S:-540}" python3 -m attention_proto run --out /tmp/ap --results "$OUT/results" \
      --no-progress "$@" 2>&1 | tee "$OUT/run.log" | grep -v "^W1\|dynamo\|^  warnings.warn\|UserWarning" | tail -60
    cp /tmp/ap/attention_proto.sqlite "$OUT/" 2>/dev/null
    cp /tmp/ap/dense_fwd_configs.json "$OUT/" 2>/dev/null
    python3 -m attention_proto findings --out /tmp/ap | cut -c1-220 ;;
  *) echo "usage: gpu_run.sh tests|studies" >&2; exit 2 ;;
esac
if [ -d "$OUT/results" ]; then (cd "$OUT" && tar czf results.tgz results && rm -rf results); fi
