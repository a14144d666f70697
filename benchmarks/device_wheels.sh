#!/usr/bin/env bash
# The wheels benchmarks/gpu.sh needs on the device machine, which has no network and lacks these
# packages (/work/.library/device/KINDS.md, "Python packages already there"), into .whl/
# (ignored by git; carried with carry [".whl"]; gpu.sh installs them there). Run here, with the
# project's venv active (versions are pinned to the ones it has):
#
#   bash benchmarks/device_wheels.sh           # download / build them: Python 3.12, x86-64 Linux
#   bash benchmarks/device_wheels.sh --check   # then rehearse gpu.sh's CPU smoke run with them
#
# What needs what (imports at module top of what the three steps import; the rest is lazy):
#   pydantic (+ pydantic-core, annotated-types, typing-inspection, typing-extensions):
#       rig/config.py, which learner/engine.py and learner/ppo.py import; DeepSpeed's config too
#   gymnasium (+ farama-notifications): envs/__init__.py; every step takes Crafter's action codec
#       (envs.crafter_env.crafter_codec) for the policy
#   deepspeed (+ hjson): learner/engine.py imports it when the engine is built. PyPI has only
#       its source, so the wheel is built here with DS_BUILD_OPS=0: pure Python, no compiled ops
#       (the engine hands DeepSpeed torch's AdamW, so no op is ever loaded)
# Not carried: ray, mlflow, crafter (no step imports them), and what the device has already.
#
# --check: installs the wheels into a temporary folder (pydantic-core's cp312 build aside: the
# venv's, of the same version, stands in), adds the device's transformers 5.17.0 and
# huggingface-hub 1.33.0 (with httpx, which the device has), makes ray, mlflow and crafter unimportable, and runs
# `PRESET=tiny DEVICE=cpu DTYPE=fp32 bash benchmarks/gpu.sh` on that: what the device will import,
# short of its torch 2.11 and CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=(pydantic pydantic-core annotated-types typing-inspection typing-extensions gymnasium
        farama-notifications hjson)
LIMIT_MB=32  # of the 64 MiB a device call carries: the repository needs the rest

version() { "$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1"; }

mkdir -p .whl
rm -f .whl/*.whl  # one version of each: two stop gpu.sh's install
pins=()
for name in "${WHEELS[@]}"; do pins+=("$name==$(version "$name")"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl \
    "deepspeed==$(version deepspeed)"
ls -l .whl
total=$(du -cb .whl/*.whl | tail -1 | cut -f1)
echo "$(ls .whl/*.whl | wc -l) wheels, $((total / 1024)) KiB"
if [ "$total" -gt $((LIMIT_MB * 1024 * 1024)) ]; then
    echo "more than $LIMIT_MB MiB of wheels" >&2
    exit 1
fi

[ "${1:-}" = --check ] || exit 0

# -- the rehearsal ---------------------------------------------------------------------------------
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip install -q --no-index --no-deps --no-compile --target "$tmp/site" \
    $(ls .whl/*.whl | grep -v pydantic_core)
# the device's transformers and hub, and the hub's httpx (the device has it, this venv not)
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$tmp/device" \
    transformers==5.17.0 huggingface-hub==1.33.0 "httpx<1" httpcore
"$PY" -m pip install -q --no-index --no-deps --no-compile --target "$tmp/site" "$tmp"/device/*.whl
mkdir "$tmp/block"
cat >"$tmp/block/sitecustomize.py" <<'EOF'
"""Packages the device has not, and no wheel brings: unimportable, as there."""
import sys

MISSING = ("ray", "mlflow", "crafter")


class _Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in MISSING:
            raise ModuleNotFoundError(f"No module named {name!r} (not on the device)")


sys.meta_path.insert(0, _Missing())
EOF
PYTHONPATH="$tmp/block:$tmp/site" PRESET=tiny DEVICE=cpu DTYPE=fp32 OUT="$tmp/out" \
    bash benchmarks/gpu.sh
ls "$tmp"/out/{learner,sync,policy}.json >/dev/null
echo "rehearsal passed: gpu.sh ran on the carried wheels, transformers 5.17.0, without ray/mlflow/crafter"
