#!/usr/bin/env bash
# Start (or restart) PostgreSQL + MLflow on the head node of a `ray up` cluster and write the sweep
# driver's MLflow login. Idempotent. It runs on the head's host, not in Ray's container, because it
# needs Docker; `ray up` has synced the checkout to the host under /tmp/ray_tmp_mount/<cluster_name>:
#
#   ray exec cluster/aws/ray-cluster.yaml --run-env host \
#     'bash /tmp/ray_tmp_mount/fakedet/opt/fakedet-src/cluster/mlflow/up.sh'
#
# Two places, two readers:
# - /etc/fakedet/server/mlflow-server.env (root:root, 600, in a 700 folder): POSTGRES_PASSWORD,
#   MLFLOW_AUTH_ADMIN_PASSWORD, MLFLOW_FLASK_SERVER_SECRET_KEY and the sweeps' user's password, taken
#   from the environment when set, else generated here, once. Only root reads it (Docker Compose runs
#   through sudo); it is mounted into no container, so no Ray job can read it, whatever its uid.
# - /etc/fakedet/client/mlflow-client.env (uid 1000 = Ray's container user, 600): MLFLOW_TRACKING_URI,
#   MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD of the non-admin sweeps' user, which Ray's
#   container on the head sees read-only at /home/ray/.fakedet (docker.run_options in the cluster YAMLs).
# MLflow listens on the head's loopback only: the sweep's driver, the one MLflow client, runs on the head
# (Ray's container shares the host's network), and you reach it through an SSH tunnel.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
server_dir="${FAKEDET_SERVER_STATE:-/etc/fakedet/server}"
client_dir="${FAKEDET_CLIENT_STATE:-/etc/fakedet/client}"
server_env="$server_dir/mlflow-server.env"
client_env="$client_dir/mlflow-client.env"
shared="${FAKEDET_SHARED:-/mnt/fakedet}"
umask 077

docker compose version >/dev/null 2>&1 || sudo docker compose version >/dev/null 2>&1 || {
  echo "docker compose (v2) is missing on this host: sudo apt-get install -y docker-compose-plugin" >&2
  exit 1
}
mountpoint -q "$shared" || echo "warning: $shared is not a mount; MLflow's data will live on the head's disk only" >&2

sudo install -d -m 700 -o root -g root "$server_dir"
sudo install -d -m 755 -o root -g root "$client_dir"
if ! sudo test -s "$server_env"; then
  gen() { openssl rand -hex 24; }  # hex: safe in URLs, .env files and configparser alike
  {
    echo "POSTGRES_PASSWORD=${POSTGRES_PASSWORD:-$(gen)}"
    echo "MLFLOW_AUTH_ADMIN_PASSWORD=${MLFLOW_AUTH_ADMIN_PASSWORD:-$(gen)}"
    echo "MLFLOW_FLASK_SERVER_SECRET_KEY=${MLFLOW_FLASK_SERVER_SECRET_KEY:-$(gen)}"
    echo "FAKEDET_MLFLOW_USERNAME=${FAKEDET_MLFLOW_USERNAME:-fakedet}"
    echo "FAKEDET_MLFLOW_PASSWORD=${FAKEDET_MLFLOW_PASSWORD:-$(gen)}"
  } | sudo sh -c 'umask 077 && cat >"$1"' sh "$server_env"
  echo "wrote $server_env (keep it: PostgreSQL only reads POSTGRES_PASSWORD when its data folder is new)"
fi
server_value() { sudo sed -n "s/^$1=//p" "$server_env"; }

# MLflow's database and artifacts: the MLflow server's alone (Ray's containers mount other folders of
# the share). PostgreSQL's image makes its own folder its user's; the mlflow image runs as uid 1000.
sudo install -d -m 700 -o root -g root "$shared/mlflow"
sudo install -d "$shared/mlflow/postgres"
sudo install -d -m 700 -o 1000 -g 1000 "$shared/mlflow/artifacts"

compose=(sudo env "FAKEDET_SHARED=$shared" docker compose -f "$here/docker-compose.yml" --env-file "$server_env")
"${compose[@]}" up -d --build --wait
"${compose[@]}" exec -T mlflow python /opt/mlflow/create_user.py

username="$(server_value FAKEDET_MLFLOW_USERNAME)"
password="$(server_value FAKEDET_MLFLOW_PASSWORD)"
# written by root, then handed to Ray's container user (uid 1000, gid 100), mode 600
sudo sh -c 'umask 077 && cat >"$1" && chown 1000:100 "$1"' sh "$client_env" <<EOF
MLFLOW_TRACKING_URI=http://127.0.0.1:5000
MLFLOW_TRACKING_USERNAME=$username
MLFLOW_TRACKING_PASSWORD=$password
EOF
echo "MLflow is up at http://127.0.0.1:5000 on the head (tunnel: ray attach CONFIG -p 5000)."
echo "Sweep login: $client_env; admin password: MLFLOW_AUTH_ADMIN_PASSWORD in $server_env (sudo cat)."
