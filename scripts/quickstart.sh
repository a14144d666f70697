#!/usr/bin/env bash
# The README's main command: set up (idempotent), then run the main job on the embedded defaults.
# Until the training loop lands this plays Crafter with the scripted expert and a random agent
# side by side, records the expert to a video, and prints both Crafter scores.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. scripts/bootstrap.sh
rig envs play --config configs/debug.yaml --agent scripted --steps 1000 --record runs/quickstart/scripted.mp4 "$@"
rig envs play --config configs/debug.yaml --agent random --steps 1000 "$@"
