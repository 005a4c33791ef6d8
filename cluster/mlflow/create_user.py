"""Create (or re-password) the non-admin MLflow user the sweeps log as. Idempotent.

Runs next to the server: `docker compose exec mlflow python /opt/mlflow/create_user.py` on a
`ray up` head (cluster/mlflow/up.sh), a Job in Kubernetes (cluster/kuberay/mlflow.yaml). Every value
comes from the environment, so no credential is written into a manifest or onto a command line:

  MLFLOW_URI                 the server (default http://127.0.0.1:5000)
  MLFLOW_AUTH_ADMIN_USERNAME the admin (default admin, as in basic_auth.ini)
  MLFLOW_AUTH_ADMIN_PASSWORD the admin's password (the same variable the server bootstraps from)
  FAKEDET_MLFLOW_USERNAME    the sweeps' user (default fakedet)
  FAKEDET_MLFLOW_PASSWORD    its password, at least 12 characters (MLflow 3.17's minimum)
"""

from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.request


def wait_healthy(uri: str, timeout_s: float = 300.0) -> None:
    # /health is exempt from both auth and host-header checks in MLflow 3.17, so it answers before login.
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"MLflow at {uri} did not become healthy within {timeout_s:.0f} s")
        time.sleep(3)


def main() -> int:
    uri = os.environ.get("MLFLOW_URI", "http://127.0.0.1:5000")
    username = os.environ.get("FAKEDET_MLFLOW_USERNAME", "fakedet")
    password = os.environ.get("FAKEDET_MLFLOW_PASSWORD", "")
    if len(password) < 12:
        print("FAKEDET_MLFLOW_PASSWORD is unset or shorter than 12 characters", file=sys.stderr)
        return 2
    wait_healthy(uri)

    # The admin's credentials reach the client the way every MLflow client takes them.
    os.environ["MLFLOW_TRACKING_USERNAME"] = os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME", "admin")
    os.environ["MLFLOW_TRACKING_PASSWORD"] = os.environ["MLFLOW_AUTH_ADMIN_PASSWORD"]
    from mlflow.exceptions import RestException
    from mlflow.server import get_app_client

    client = get_app_client("basic-auth", tracking_uri=uri)
    try:
        client.get_user(username)
    except RestException:
        client.create_user(username, password)
        print(f"created MLflow user {username!r}")
    else:
        # Keep the server in step with the secret, which may have been rotated.
        client.update_user_password(username, password)
        print(f"MLflow user {username!r} exists; password set from FAKEDET_MLFLOW_PASSWORD")
    return 0


if __name__ == "__main__":
    sys.exit(main())
