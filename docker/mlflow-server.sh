#!/usr/bin/env bash
# Start the MLflow tracking server with basic auth: what the `mlflow` service of
# docker-compose.yml runs, and what tests/test_cluster.py runs (on SQLite) to test it.
#
# Basic auth is not optional here: the server refuses to start without admin credentials and a
# Flask secret key. Artifacts are proxied (--serve-artifacts): clients upload and download through
# the server over HTTP with their MLflow credentials, so only this container holds storage keys.
#
# Settings (environment):
#   MLFLOW_BACKEND_STORE_URI      runs, params, metrics (compose: postgresql://...@postgres/mlflow)
#   MLFLOW_ARTIFACTS_DESTINATION  where proxied artifacts go (compose: s3://<bucket>/artifacts on
#                                 MinIO, with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
#                                 MLFLOW_S3_ENDPOINT_URL in this container only)
#   MLFLOW_AUTH_DATABASE_URI      users and permissions (default: the backend store)
#   MLFLOW_ADMIN_USERNAME, MLFLOW_ADMIN_PASSWORD   the admin user created on first start (a
#                                 password of at least 12 characters; later changes go through
#                                 MLflow's update-password API, see docs/cluster.md)
#   MLFLOW_FLASK_SERVER_SECRET_KEY  signs the UI's sessions and CSRF tokens (read by MLflow itself)
#   MLFLOW_HOST (0.0.0.0), MLFLOW_PORT (5000), MLFLOW_WORKERS (2)
#   MLFLOW_ALLOWED_HOSTS          Host headers accepted (DNS-rebinding protection); default: the
#                                 compose name `mlflow`, localhost and private addresses, any port
#   MLFLOW_AUTH_CONFIG_DIR        where the generated auth ini goes (default: a new private dir)
set -euo pipefail

need() {
  if [ -z "${!1:-}" ]; then
    echo "$0: $1 is not set (see .env.example and docs/cluster.md)" >&2
    exit 2
  fi
}
for var in MLFLOW_BACKEND_STORE_URI MLFLOW_ARTIFACTS_DESTINATION MLFLOW_ADMIN_USERNAME \
  MLFLOW_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY; do
  need "$var"
done

# The auth app reads its settings from the ini that MLFLOW_AUTH_CONFIG_PATH names. It holds the
# admin password, so it is written with owner-only permissions, fresh at every start (the admin
# user is created only when the user store is empty; the ini is not a place to rotate it).
umask 077
config_dir="${MLFLOW_AUTH_CONFIG_DIR:-$(mktemp -d)}"
mkdir -p "$config_dir"
export MLFLOW_AUTH_CONFIG_PATH="$config_dir/basic_auth.ini"
cat >"$MLFLOW_AUTH_CONFIG_PATH" <<EOF
[mlflow]
default_permission = READ
database_uri = ${MLFLOW_AUTH_DATABASE_URI:-$MLFLOW_BACKEND_STORE_URI}
admin_username = $MLFLOW_ADMIN_USERNAME
admin_password = $MLFLOW_ADMIN_PASSWORD
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF

allowed_default="mlflow,mlflow:*,localhost,localhost:*,127.0.0.1,127.0.0.1:*,10.*,172.*,192.168.*"
echo "$0: mlflow server on ${MLFLOW_HOST:-0.0.0.0}:${MLFLOW_PORT:-5000}, basic auth on," \
  "artifacts proxied to $MLFLOW_ARTIFACTS_DESTINATION" >&2
exec mlflow server \
  --app-name basic-auth \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --serve-artifacts \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
  --host "${MLFLOW_HOST:-0.0.0.0}" \
  --port "${MLFLOW_PORT:-5000}" \
  --workers "${MLFLOW_WORKERS:-2}" \
  --allowed-hosts "${MLFLOW_ALLOWED_HOSTS:-$allowed_default}"
