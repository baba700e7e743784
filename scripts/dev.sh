#!/usr/bin/env bash
# One entry point for a fresh machine: sets up .venv (if needed) and then
#   run   [args]  runs the main job:  attention-proto run [args]  (default: all studies)
#   test  [args]  runs the CPU test suite (pytest, GPU tests skipped without CUDA)
# On a machine without a GPU the pinned CPU stack is installed: torch 2.13.0 (CPU
# build), triton 3.6.0, numpy < 2.4 (triton 3.6's interpreter breaks on numpy 2.4).
# Set ATTENTION_PROTO_PYTHON to use an existing interpreter (e.g. the GPU machine's).
set -euo pipefail
cd "$(dirname "$0")/.."
cmd="${1:-}"; shift || true
case "$cmd" in run|test) ;; *) echo "usage: scripts/dev.sh run|test [args]" >&2; exit 2 ;; esac

if [ -n "${ATTENTION_PROTO_PYTHON:-}" ]; then
  py="$ATTENTION_PROTO_PYTHON"
else
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  py=.venv/bin/python
  stamp=.venv/.attention-proto-installed
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$py" -m pip install -q --upgrade pip >/dev/null
    "$py" -m pip install -q "torch==2.13.0" "triton==3.6.0" "numpy<2.4"
    "$py" -m pip install -q -e ".[test,plots,transformers]"
    touch "$stamp"
  fi
fi

if [ "$cmd" = run ]; then
  exec "$py" -m attention_proto run "$@"
else
  exec "$py" -m pytest -q -m "not gpu" "$@"
fi
