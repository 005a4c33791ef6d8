"""Every command the deployment runs or tells its reader to run is valid: each `python sweeps/run.py ...`
in a manifest, a script or a README parses with the real command line (and a cluster run writes to the
shared storage and a tracking server), the RayJob's entrypoint is the sweep wired to the cluster's
MLflow, `fakedet prepare` lines parse, shell commands pass `bash -n`, and the README starts MLflow from
where `ray up` puts the checkout. The checkers also run against known-bad samples."""

from __future__ import annotations

import functools
import re
import shlex
import subprocess
from urllib.parse import urlparse

import pytest

from cluster_files import (CLUSTER, CLUSTER_README, LAUNCHERS, ROOT, SHARED, launcher, load, markdown_code,
                           mlflow_k8s_command, one, yaml_files)

PLACEHOLDERS = {"MLFLOW_TRACKING_URI": "http://mlflow.example.internal:5000"}
CONTROL = {"&&", "||", ";", "|", "&", ";;", ")", "(", "\n"}


def substitute_env(text: str) -> str:
    """$VAR, ${VAR} and ${VAR:-default} → a dummy value the parser accepts."""
    def value(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        return PLACEHOLDERS.get(name, f"dummy-{name.lower()}")

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-=?+][^}]*)?\}|\$([A-Za-z_][A-Za-z0-9_]*)", value, text)


def shell_tokens(text: str) -> list[str]:
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def sweep_commands(text: str) -> list[list[str]]:
    """Every `python sweeps/run.py ...` in a shell text, as the argv after `sweeps/run.py`, looking
    inside quoted arguments too (`bash -c '...'`, `ray exec CONFIG '...'`)."""
    if "sweeps/run.py" not in text:
        return []
    found = []
    for line in substitute_env(text.replace("\\\n", " ")).splitlines():
        if "sweeps/run.py" in line:
            found += _sweep_commands_in_line(line)
    return found


def _sweep_commands_in_line(line: str) -> list[list[str]]:
    found = []
    tokens = shell_tokens(line)
    for i, tok in enumerate(tokens):
        if re.fullmatch(r"python3?", tok) and i + 1 < len(tokens) and tokens[i + 1].endswith("sweeps/run.py"):
            argv = []
            for t in tokens[i + 2:]:
                if t in CONTROL:
                    break
                argv.append(t)
            found.append(argv)
        elif "sweeps/run.py" in tok and " " in tok:
            found += sweep_commands(tok)
    return found


def unquoted_shell_syntax(entrypoint: str) -> list[str]:
    """Shell operators and expansions a RayJob entrypoint leaves unquoted: KubeRay pastes the entrypoint
    into the submitter pod's shell line, so those would run there, not on the head."""
    bad = [t for t in shell_tokens(entrypoint) if t in CONTROL]
    unquoted = re.sub(r"'[^']*'", "", entrypoint)
    if "$" in unquoted or "`" in unquoted:
        bad.append("$ or ` outside single quotes")
    return bad


@functools.lru_cache(maxsize=1)
def sweep_parser():
    from fakedet.sweep_cli import build_parser

    return build_parser()


def parse_sweep(argv: list[str]):
    try:
        return sweep_parser().parse_args(argv)
    except SystemExit as e:  # argparse's way of saying no
        raise AssertionError(f"`python sweeps/run.py {shlex.join(argv)}` does not parse") from e


def strings_in(doc) -> list[str]:
    if isinstance(doc, dict):
        return [s for v in doc.values() for s in strings_in(v)]
    if isinstance(doc, list):
        return [s for v in doc for s in strings_in(v)]
    return [doc] if isinstance(doc, str) else []


def all_sweep_commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in yaml_files():
        for text in (s for d in load(path) for s in strings_in(d)):
            found += [(str(path.relative_to(ROOT)), argv) for argv in sweep_commands(text)]
    for path in (CLUSTER_README, ROOT / "README.md"):
        for block in markdown_code(path.read_text()):
            found += [(str(path.relative_to(ROOT)), argv) for argv in sweep_commands(block)]
    for path in CLUSTER.rglob("*.sh"):
        found += [(str(path.relative_to(ROOT)), argv) for argv in sweep_commands(path.read_text())]
    return found


SWEEP_COMMANDS = all_sweep_commands()


# ---------------------------------------------------------------------------------------------------
# sweep commands
# ---------------------------------------------------------------------------------------------------
def test_sweep_commands_are_found_where_expected():
    sources = [s for s, _ in SWEEP_COMMANDS]
    assert sources.count("cluster/kuberay/rayjob-ablation.yaml") == 1
    # AWS, GCP and KubeRay runs, a resume and hpo, at least
    assert sources.count("cluster/README.md") >= 5


@pytest.mark.parametrize("source, argv", SWEEP_COMMANDS, ids=[f"{s}:{i}" for i, (s, _) in enumerate(SWEEP_COMMANDS)])
def test_sweep_command_parses_with_the_real_cli(source, argv):
    args = parse_sweep(argv)
    # a cluster run: results on shared storage, runs on a server (`cutoff` has no --address)
    if getattr(args, "address", None):
        assert args.address == "auto"
        assert args.storage_path and (args.storage_path.startswith(SHARED + "/") or "://" in args.storage_path)
        assert args.tracking_uri and args.tracking_uri.startswith(("http://", "https://"))


def test_rayjob_entrypoint_is_the_sweep_wired_to_the_cluster():
    entrypoint = one("RayJob")["spec"]["entrypoint"]
    assert not unquoted_shell_syntax(entrypoint)
    (argv,) = sweep_commands(entrypoint)
    args = parse_sweep(argv)
    assert args.kind == "ablation" and args.address == "auto"
    assert args.storage_path.startswith(SHARED + "/") and args.cache_root.startswith(SHARED + "/")
    # The tracking URI names the MLflow Service, and MLflow's host-header check lets that name in.
    uri = urlparse(args.tracking_uri)
    service = one("Service", "mlflow")
    assert uri.hostname.split(".")[0] == service["metadata"]["name"]
    assert uri.hostname in ("mlflow", f"mlflow.{service['metadata']['namespace']}.svc.cluster.local")
    assert uri.port == service["spec"]["ports"][0]["port"]
    allowed = [a for a in mlflow_k8s_command() if a.startswith("--allowed-hosts=")][0].split("=", 1)[1].split(",")
    assert uri.netloc in allowed


def test_fakedet_prepare_commands_in_the_cluster_readme_parse():
    from fakedet.cli import build_parser

    lines = [l for b in markdown_code(CLUSTER_README.read_text()) for l in b.replace("\\\n", " ").splitlines()
             if l.strip().startswith("fakedet prepare")]
    assert lines
    for line in lines:
        argv = shlex.split(substitute_env(line))[1:]
        try:
            build_parser().parse_args(argv)
        except SystemExit as e:
            raise AssertionError(f"`{line.strip()}` does not parse") from e


# ---------------------------------------------------------------------------------------------------
# shell and scripts
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_launcher_shell_commands_are_valid_bash(cloud):
    cfg = launcher(cloud)
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    script = "\n".join(c for k in keys for c in cfg.get(k, []))
    r = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_mlflow_scripts_are_valid():
    r = subprocess.run(["bash", "-n", str(CLUSTER / "mlflow" / "up.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    compile((CLUSTER / "mlflow" / "create_user.py").read_text(), "create_user.py", "exec")


@pytest.mark.parametrize("cloud", sorted(LAUNCHERS))
def test_readme_starts_mlflow_from_where_ray_up_puts_the_checkout(cloud):
    from ray.autoscaler.sdk import get_docker_host_mount_location  # where docker-mode file mounts land on the host

    cfg = launcher(cloud)
    (target,) = [remote for remote, local in cfg["file_mounts"].items() if local == "."]
    host_copy = f"{get_docker_host_mount_location(cfg['cluster_name'])}{target}/cluster/mlflow/up.sh"
    assert f"ray exec cluster/{cloud}/ray-cluster.yaml --run-env host 'bash {host_copy}'" in CLUSTER_README.read_text()


# ---------------------------------------------------------------------------------------------------
# the checkers themselves fail on bad input
# ---------------------------------------------------------------------------------------------------
def test_command_checkers_catch_bad_commands():
    assert unquoted_shell_syntax("cd /opt/fakedet && python sweeps/run.py ablation")
    assert unquoted_shell_syntax("python sweeps/run.py ablation --tracking-uri $MLFLOW_TRACKING_URI")
    assert not unquoted_shell_syntax("bash -c 'cd /opt/fakedet && python sweeps/run.py ablation --x $Y'")
    (argv,) = sweep_commands("ray exec c.yaml 'cd /x && python sweeps/run.py ablation --bogus-flag 1'")
    with pytest.raises(AssertionError, match="does not parse"):
        parse_sweep(argv)
    r = subprocess.run(["bash", "-n"], input="if true; then echo", capture_output=True, text=True)
    assert r.returncode != 0, "bash -n must refuse an unfinished if"
