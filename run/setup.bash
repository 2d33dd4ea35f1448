#!/usr/bin/env bash
# Sourced by the run/*.bash scripts: makes sure a Python environment with the requirements exists and
# exports PY (the interpreter to use). Uses the current Python when it already satisfies
# requirements.txt; otherwise creates .venv. On a machine without CUDA it installs the CPU build of
# torch==2.13.0 first, so pip never pulls a multi-GB CUDA wheel.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

_satisfied() {
  "$1" - "$ROOT/requirements.txt" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version, PackageNotFoundError
try:
    from packaging.requirements import Requirement
except ImportError:
    sys.exit(1)
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if not line:
        continue
    req = Requirement(line)
    try:
        if not req.specifier.contains(version(req.name), prereleases=True):
            sys.exit(1)
    except PackageNotFoundError:
        sys.exit(1)
PY
}

SYSTEM_PY="$(command -v python3 || command -v python)"
if [ -x "$ROOT/.venv/bin/python" ] && _satisfied "$ROOT/.venv/bin/python"; then
  PY="$ROOT/.venv/bin/python"
elif _satisfied "$SYSTEM_PY"; then
  PY="$SYSTEM_PY"
else
  echo "setup: creating $ROOT/.venv and installing requirements.txt" >&2
  [ -x "$ROOT/.venv/bin/python" ] || "$SYSTEM_PY" -m venv "$ROOT/.venv"
  PY="$ROOT/.venv/bin/python"
  "$PY" -m pip install -q --upgrade pip >&2
  if ! "$PY" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
      "$PY" -m pip install -q "torch>=2.4,<=2.13.0" >&2
    else
      # The CPU wheel from PyTorch's own CPU index (PyPI's Linux wheel of torch bundles CUDA libraries);
      # where that index cannot be reached, the same pinned version from the configured index.
      if ! "$PY" -m pip install -q --timeout 20 --retries 1 --index-url https://download.pytorch.org/whl/cpu \
          "torch==2.13.0" >/dev/null 2>&1; then
        echo "setup: PyTorch's CPU index cannot be reached; torch==2.13.0 from the configured index" >&2
        "$PY" -m pip install -q "torch==2.13.0" >&2
      fi
    fi
  fi
  "$PY" -m pip install -q -r "$ROOT/requirements.txt" >&2
fi
export PY

# A CPU build of torch on a machine whose nvidia-smi sees a GPU (an environment made on a login node without
# one): say so here; a study on real data refuses to start on it (lxmert/core/environment.py).
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1 \
    && [ -z "$("$PY" -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null)" ]; then
  echo "setup: warning: nvidia-smi sees a GPU but $PY has a CPU build of torch; install the CUDA build:" \
       "$PY -m pip install --force-reinstall torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" >&2
fi

# Runs `python -m lxmert <command> --config $CONFIG "$@"`, on NPROC processes through torchrun when NPROC > 1.
# The config and every override are checked first (a fraction of a second), before any other work.
launch() {
  local command="$1"; shift
  "$PY" -m lxmert check --config "$CONFIG" "$@" >/dev/null || exit $?
  if [ "${NPROC:-1}" -gt 1 ]; then
    exec "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m lxmert "$command" --config "$CONFIG" "$@"
  fi
  exec "$PY" -m lxmert "$command" --config "$CONFIG" "$@"
}
