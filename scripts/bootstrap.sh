#!/usr/bin/env bash
# Create .venv and install rig-rl into it, idempotently. Sourced by quickstart.sh and test.sh.
#
# PyTorch is installed first, on its own, because an unpinned `torch` from PyPI pulls several GB
# of CUDA wheels: a machine without an NVIDIA GPU gets the CPU build (a local wheel if pip can
# find one, else PyTorch's CPU index), a GPU machine the normal build. Everything else then
# installs against that torch (pyproject's `torch>=...` is already satisfied, so pip adds none).
#
# Environment knobs:  RIG_PYTHON (interpreter, default python3), RIG_VENV (default .venv),
#                     RIG_TORCH (torch requirement, default torch==2.13.0),
#                     RIG_DEVICE (cpu|cuda, default: cuda iff nvidia-smi sees a GPU).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RIG_VENV:-$ROOT/.venv}"
PYTHON="${RIG_PYTHON:-python3}"
TORCH="${RIG_TORCH:-torch==2.13.0}"
EXTRAS="${RIG_EXTRAS:-dev}"

if [ -z "${RIG_DEVICE:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then RIG_DEVICE=cuda; else RIG_DEVICE=cpu; fi
fi

# pip, minus one harmless warning some pip configurations print once per package.
pipq() { pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

# Re-install only when the inputs changed: the stamp holds a hash of what the install depends on.
stamp="$VENV/.rig-installed"
want="$( { cat "$ROOT/pyproject.toml"; echo "$TORCH $RIG_DEVICE $EXTRAS"; } | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  return 0 2>/dev/null || exit 0
fi

echo "[setup] installing PyTorch ($TORCH, $RIG_DEVICE)"
if ! python -c "import torch" >/dev/null 2>&1; then
  if [ "$RIG_DEVICE" = cpu ]; then
    # A CPU wheel that pip can see without an index (find-links, a wheelhouse) is used first,
    # with its dependencies from the normal index; else PyTorch's own CPU index.
    wheels="$VENV/.torch-wheel"
    rm -rf "$wheels"
    if pip download --quiet --no-index --no-deps --dest "$wheels" "$TORCH" >/dev/null 2>&1; then
      pipq install --quiet "$wheels"/torch-*.whl
    else
      pipq install --quiet "$TORCH" --index-url https://download.pytorch.org/whl/cpu \
        --extra-index-url https://pypi.org/simple
    fi
    rm -rf "$wheels"
  else
    pipq install --quiet "$TORCH"
  fi
fi
echo "[setup] installing rig-rl[$EXTRAS] (first time: a few minutes)"
pipq install --quiet -e "$ROOT[$EXTRAS]"
python - <<'PY'
import torch
print(f"[setup] torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
PY
echo "$want" > "$stamp"
