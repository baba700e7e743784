#!/usr/bin/env bash
# compute-sanitizer over every Triton kernel of the library (scripts/sanitize.py), one tool at a time.
#
# Usage: scripts/sanitize.sh [SUMMARY_PATH]
#   SUMMARY_PATH default: $OUT/sanitizer-summary.txt when $OUT is set, else
#   results/<gpu-slug>/sanitizer-summary.txt. Full logs go to <summary dir>/sanitizer-logs/.
# Environment:
#   SANITIZER_TOOLS   tools to run, in order (default "memcheck racecheck synccheck initcheck")
#   COMPUTE_SANITIZER the binary (default: PATH, /usr/local/cuda*/bin, the nvidia pip wheels)
#   SANITIZE_ONLY     a regex of sanitize.py cases (default: all)
#   SANITIZER_EXTRA   extra compute-sanitizer flags
#   PYTHON            the interpreter (default .venv/bin/python, else python)
#
# PYTORCH_NO_CUDA_MEMORY_CACHING=1 makes every tensor its own cudaMalloc: without it an overrun
# lands inside PyTorch's cached block (another tensor's memory) and memcheck cannot see it.
# The bar (docs/reliability.md): 0 errors for memcheck and racecheck over every kernel.
# Exit status: 0 when every tool reports 0 errors and every case ran, 1 otherwise.
set -u
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3 || command -v python)
TOOLS=${SANITIZER_TOOLS:-"memcheck racecheck synccheck initcheck"}
ONLY=${SANITIZE_ONLY:-}
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

find_sanitizer() {
  if [ -n "${COMPUTE_SANITIZER:-}" ]; then echo "$COMPUTE_SANITIZER"; return; fi
  if command -v compute-sanitizer >/dev/null 2>&1; then command -v compute-sanitizer; return; fi
  local c
  for c in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer \
           /opt/nvidia/*/compute-sanitizer/compute-sanitizer; do
    [ -x "$c" ] && { echo "$c"; return; }
  done
  # the nvidia-cuda-sanitizer-api wheel ships the binary inside site-packages
  "$PY" - <<'EOF' 2>/dev/null
import glob, os, site
for d in site.getsitepackages():
    for c in sorted(glob.glob(os.path.join(d, "nvidia", "*", "compute-sanitizer", "compute-sanitizer"))):
        if os.access(c, os.X_OK):
            print(c); raise SystemExit
EOF
}

SAN=$(find_sanitizer)
slug=$("$PY" -c "from attention_proto.runtime.device import gpu_slug; print(gpu_slug())" 2>/dev/null || echo unknown)
SUMMARY=${1:-${OUT:+$OUT/sanitizer-summary.txt}}
SUMMARY=${SUMMARY:-results/$slug/sanitizer-summary.txt}
LOGDIR=$(dirname "$SUMMARY")/sanitizer-logs
mkdir -p "$LOGDIR"
rm -f "$LOGDIR"/*.log "$LOGDIR"/*.stdout "$LOGDIR"/*-cases.json

{
  echo "# compute-sanitizer summary: scripts/sanitize.sh over scripts/sanitize.py"
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "gpu: $slug"
  echo "driver: $(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)"
  # ATTENTION_PROTO_COMMIT first: the GPU machine's copy of the tree may carry a stale .git
  echo "commit: ${ATTENTION_PROTO_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo -dirty)}"
  echo "versions: $("$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)')"
  echo "PYTORCH_NO_CUDA_MEMORY_CACHING=1; cases: ${ONLY:-all}"
} > "$SUMMARY"

if [ -z "$SAN" ]; then
  echo "sanitizer: NOT FOUND (set COMPUTE_SANITIZER, install the CUDA toolkit or the nvidia-cuda-sanitizer-api wheel)" | tee -a "$SUMMARY"
  exit 1
fi
echo "sanitizer: $SAN ($("$SAN" --version 2>/dev/null | grep -i version | head -1))" >> "$SUMMARY"

overall=0
printf '\n%-10s %-5s %-7s %-9s %s\n' tool exit errors cases log >> "$SUMMARY"
for tool in $TOOLS; do
  log="$LOGDIR/$tool.log"
  cases_json="$LOGDIR/$tool-cases.json"
  flags=(--tool "$tool" --print-limit 100 --log-file "$log")
  case "$tool" in
    memcheck) flags+=(--leak-check no) ;;          # PyTorch keeps allocations alive by design
    racecheck) flags+=(--racecheck-report all) ;;  # hazards and their analysis
  esac
  echo "== $tool: $SAN ${flags[*]} ${SANITIZER_EXTRA:-} $PY scripts/sanitize.py" >&2
  t0=$(date +%s)
  # shellcheck disable=SC2086
  "$SAN" "${flags[@]}" ${SANITIZER_EXTRA:-} "$PY" scripts/sanitize.py ${ONLY:+--only "$ONLY"} --summary "$cases_json" \
    > "$LOGDIR/$tool.stdout" 2>&1
  rc=$?
  secs=$(( $(date +%s) - t0 ))
  errors=$(grep -aoE 'ERROR SUMMARY: [0-9]+' "$log" 2>/dev/null | tail -1 | grep -oE '[0-9]+$')
  hazards=$(grep -aoE 'RACECHECK SUMMARY: [0-9]+ hazard' "$log" 2>/dev/null | tail -1 | grep -oE '[0-9]+' | head -1)
  # racecheck prints no ERROR SUMMARY: its "RACECHECK SUMMARY: N hazards displayed (E errors, W warnings)"
  [ -z "$errors" ] && errors=$(grep -aoE 'RACECHECK SUMMARY: .*\([0-9]+ errors' "$log" 2>/dev/null | tail -1 \
    | grep -oE '\([0-9]+' | tr -d '(')
  errors=${errors:-?}
  cases=$("$PY" - "$cases_json" <<'EOF' 2>/dev/null || echo "?"
import json, sys
d = json.load(open(sys.argv[1]))["cases"]
ok = sum(r["status"] == "ok" for r in d.values()); skip = sum(r["status"] == "skipped" for r in d.values())
print(f"{ok}/{len(d) - skip}" + (f"+{skip}skip" if skip else ""))
EOF
)
  printf '%-10s %-5s %-7s %-9s %s (%ss)%s\n' "$tool" "$rc" "$errors" "$cases" "$log" "$secs" \
    "${hazards:+ racecheck hazards: $hazards}" >> "$SUMMARY"
  if [ "$errors" != "0" ] || [ "$rc" != "0" ]; then overall=1; fi
done

first=$(ls "$LOGDIR"/*-cases.json 2>/dev/null | head -1)
if [ -n "$first" ]; then
  "$PY" - "$first" >> "$SUMMARY" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
print("\nkernels launched:", ", ".join(d["kernels_launched"]))
print("kernels in the source not launched:",
      "(not checked: SANITIZE_ONLY)" if d.get("only") else (", ".join(d["kernels_not_launched"]) or "none"))
print("variants compiled:", d["variants_compiled"])
bad = {n: r for n, r in d["cases"].items() if r["status"] != "ok"}
for n, r in bad.items():
    print(f"case {n}: {r['status']}: {r.get('error') or r.get('why')}")
EOF
fi
for tool in $TOOLS; do
  log="$LOGDIR/$tool.log"
  if grep -aE '^=========' "$log" 2>/dev/null | grep -avE 'SUMMARY|COMPUTE-SANITIZER' \
       | grep -aqiE 'invalid|error|race|hazard|uninitialized|barrier|warning'; then
    echo -e "\nfirst findings of $tool:" >> "$SUMMARY"
    grep -aE '^=========' "$log" | grep -avE 'COMPUTE-SANITIZER|SUMMARY' | head -12 >> "$SUMMARY"
  fi
done
echo -e "\nresult: $([ $overall = 0 ] && echo 'PASS (0 errors)' || echo 'FAIL')" >> "$SUMMARY"
cat "$SUMMARY"
exit $overall
