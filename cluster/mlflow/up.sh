#!/usr/bin/env bash
# Start (or restart) PostgreSQL + MLflow on the head node of a `ray up` cluster and write the sweep
# driver's MLflow credentials. Idempotent. It runs on the head's host, not in Ray's container, because
# it needs Docker; `ray up` has synced the checkout to the host under /tmp/ray_tmp_mount/<cluster_name>:
#
#   ray exec cluster/aws/ray-cluster.yaml --run-env host \
#     'bash /tmp/ray_tmp_mount/fakedet/opt/fakedet-src/cluster/mlflow/up.sh'
#
# Secrets: POSTGRES_PASSWORD, MLFLOW_AUTH_ADMIN_PASSWORD, MLFLOW_FLASK_SERVER_SECRET_KEY and
# FAKEDET_MLFLOW_PASSWORD are taken from the environment when set, else generated here, once, and kept
# in ~/.fakedet/mlflow-server.env (mode 600). They never leave the head and are never on a command line.
# Outputs ~/.fakedet/mlflow-client.env (MLFLOW_TRACKING_URI/USERNAME/PASSWORD), which Ray's container
# sees read-only at /home/ray/.fakedet (docker.run_options in the cluster YAMLs).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
state="${FAKEDET_STATE:-$HOME/.fakedet}"
export FAKEDET_SHARED="${FAKEDET_SHARED:-/mnt/fakedet}"
server_env="$state/mlflow-server.env"
client_env="$state/mlflow-client.env"
umask 077
mkdir -p "$state"
chmod 711 "$state"  # Ray's container user (uid 1000) may pass through to the one file meant for it

docker compose version >/dev/null 2>&1 || {
  echo "docker compose (v2) is missing on this host: sudo apt-get install -y docker-compose-plugin" >&2
  exit 1
}
mountpoint -q "$FAKEDET_SHARED" || echo "warning: $FAKEDET_SHARED is not a mount; MLflow's data will live on the head's disk only" >&2

if [ ! -s "$server_env" ]; then
  gen() { openssl rand -hex 24; }  # hex: safe in URLs, .env files and configparser alike
  {
    echo "POSTGRES_PASSWORD=${POSTGRES_PASSWORD:-$(gen)}"
    echo "MLFLOW_AUTH_ADMIN_PASSWORD=${MLFLOW_AUTH_ADMIN_PASSWORD:-$(gen)}"
    echo "MLFLOW_FLASK_SERVER_SECRET_KEY=${MLFLOW_FLASK_SERVER_SECRET_KEY:-$(gen)}"
    echo "FAKEDET_MLFLOW_USERNAME=${FAKEDET_MLFLOW_USERNAME:-fakedet}"
    echo "FAKEDET_MLFLOW_PASSWORD=${FAKEDET_MLFLOW_PASSWORD:-$(gen)}"
  } >"$server_env"
  echo "wrote $server_env (keep it: PostgreSQL only reads POSTGRES_PASSWORD when its data folder is new)"
fi
set -a
# shellcheck disable=SC1090
. "$server_env"
set +a

# The head's private address: where the cluster's nodes reach MLflow. Override with MLFLOW_BIND_ADDRESS.
if [ -z "${MLFLOW_BIND_ADDRESS:-}" ]; then
  MLFLOW_BIND_ADDRESS="$(ip -4 route get 1.1.1.1 | awk '{for (i = 1; i < NF; i++) if ($i == "src") print $(i + 1)}')"
fi
export MLFLOW_BIND_ADDRESS

sudo mkdir -p "$FAKEDET_SHARED/mlflow/postgres" "$FAKEDET_SHARED/mlflow/artifacts"
sudo chown 1000:1000 "$FAKEDET_SHARED/mlflow/artifacts"  # the mlflow image's user

compose=(docker compose -f "$here/docker-compose.yml" --env-file "$server_env")
"${compose[@]}" up -d --build --wait
"${compose[@]}" exec -T mlflow python /opt/mlflow/create_user.py

sudo rm -f "$client_env"  # it belongs to uid 1000 after a previous run
cat >"$client_env" <<EOF
MLFLOW_TRACKING_URI=http://$MLFLOW_BIND_ADDRESS:5000
MLFLOW_TRACKING_USERNAME=$FAKEDET_MLFLOW_USERNAME
MLFLOW_TRACKING_PASSWORD=$FAKEDET_MLFLOW_PASSWORD
EOF
sudo chown 1000:100 "$client_env"  # readable by Ray's container user only (mode 600)
echo "MLflow is up at http://$MLFLOW_BIND_ADDRESS:5000 (private network) and http://127.0.0.1:5000 (head only)."
echo "Sweep credentials: $client_env; admin password: MLFLOW_AUTH_ADMIN_PASSWORD in $server_env."
