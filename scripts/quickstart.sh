#!/usr/bin/env bash
# The README's main command: set up (idempotent), then run the main job on the embedded defaults:
# a debug RL run of the tiny RIG policy on Crafter (local Ray, 2 env runners x 4 envs, 1
# imagination actor, DeepSpeed on CPU, MLflow in runs/mlflow.db). Extra arguments are passed on,
# e.g. `bash scripts/quickstart.sh train.iterations=4`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/bootstrap.sh
rig train --config configs/debug.yaml "$@"
