#!/usr/bin/env bash
# Start one Ray node in the foreground: what the ray-head, ray-worker, ray-worker-mc and learner
# services of docker-compose.yml run, and what tests/test_cluster.py runs on 127.0.0.1.
#
#   docker/ray-node.sh head      # GCS, dashboard and job server (the cluster's address)
#   docker/ray-node.sh worker    # joins the head at $RAY_HEAD_ADDRESS
#
# Token authentication is not optional here: the node refuses to start unless RAY_AUTH_MODE=token
# and RAY_AUTH_TOKEN are set (docker-compose.yml takes the token from .env; see .env.example).
# Ray reads both variables itself, in every process of the node, so nothing is written to disk.
#
# Settings (environment; empty or unset: Ray's default):
#   RAY_HEAD_ADDRESS     worker: host:port of the head's GCS (default ray-head:6379)
#   RAY_PORT             head: GCS port (default 6379)
#   RAY_DASHBOARD_HOST   head: interface of the dashboard and job API (default 0.0.0.0)
#   RAY_DASHBOARD_PORT   head: dashboard and job API port (default 8265)
#   RAY_CLIENT_PORT      head: Ray Client server port, ray://host:port (default 10001; empty:
#                        no Ray Client server, e.g. where `ray[client]` is not installed)
#   RAY_INCLUDE_DASHBOARD  head: true (default) or false (where `ray[default]` is not installed:
#                        no dashboard, job API or state API then)
#   RAY_NUM_CPUS, RAY_NUM_GPUS, RAY_RESOURCES (JSON, e.g. {"learner": 1}): what the node offers
#   RAY_OBJECT_STORE_BYTES  object store size (default: 30% of memory, capped by /dev/shm)
#   RAY_NODE_IP          the address other nodes reach this one at (default: detected)
#   RAY_TEMP_DIR         Ray's session folder (default /tmp/ray)
#   RAY_EXTRA_ARGS       more `ray start` flags, split on spaces (e.g. fixed ports for a firewall)
#   XVFB_DISPLAY         e.g. :99: start a virtual display first (MineRL renders through one); the
#                        env runners Ray starts on this node inherit DISPLAY
set -euo pipefail

role="${1:-}"
if [ "$role" != head ] && [ "$role" != worker ]; then
  echo "usage: $0 head|worker" >&2
  exit 2
fi
if [ "${RAY_AUTH_MODE:-}" != token ] || [ -z "${RAY_AUTH_TOKEN:-}" ]; then
  echo "$0: refusing to start a Ray node without token authentication:" \
    "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (see .env.example)" >&2
  exit 2
fi

args=(--block --disable-usage-stats)
if [ "$role" = head ]; then
  args+=(--head --port="${RAY_PORT:-6379}" --include-dashboard="${RAY_INCLUDE_DASHBOARD:-true}"
    --dashboard-host="${RAY_DASHBOARD_HOST:-0.0.0.0}" --dashboard-port="${RAY_DASHBOARD_PORT:-8265}")
  client_port="${RAY_CLIENT_PORT-10001}"  # unset: 10001; set but empty: no client server
  [ -n "$client_port" ] && args+=(--ray-client-server-port="$client_port")
else
  args+=(--address="${RAY_HEAD_ADDRESS:-ray-head:6379}")
fi
[ -n "${RAY_NUM_CPUS:-}" ] && args+=(--num-cpus="$RAY_NUM_CPUS")
[ -n "${RAY_NUM_GPUS:-}" ] && args+=(--num-gpus="$RAY_NUM_GPUS")
[ -n "${RAY_RESOURCES:-}" ] && args+=(--resources="$RAY_RESOURCES")
[ -n "${RAY_OBJECT_STORE_BYTES:-}" ] && args+=(--object-store-memory="$RAY_OBJECT_STORE_BYTES")
[ -n "${RAY_NODE_IP:-}" ] && args+=(--node-ip-address="$RAY_NODE_IP")
[ -n "${RAY_TEMP_DIR:-}" ] && args+=(--temp-dir="$RAY_TEMP_DIR")
# shellcheck disable=SC2206  # split on purpose: a list of flags
[ -n "${RAY_EXTRA_ARGS:-}" ] && args+=($RAY_EXTRA_ARGS)

if [ -n "${XVFB_DISPLAY:-}" ]; then
  Xvfb "$XVFB_DISPLAY" -screen 0 1024x768x24 -nolisten tcp &
  export DISPLAY="$XVFB_DISPLAY"
fi

echo "ray-node.sh: ray start ${args[*]}" >&2
exec ray start "${args[@]}"
