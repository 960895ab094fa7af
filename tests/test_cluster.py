"""Tests for the cluster stage: cluster.yaml (Ray cluster launcher, GCP), checked offline.

Ray's own validator covers the schema; the rest of this file checks what the schema cannot see,
because GCP ``node_config`` is free-form: GPU declarations, driver install, versions, secrets,
and how the cluster is locked down (Ray token auth on every node, the token from Secret Manager,
the network tag and the README's firewall rule, scopes, checksummed downloads). ``ray start``
commands are parsed by Ray's own CLI definition, so a flag Ray does not know fails here.
Nothing here talks to GCP (``bootstrap_config`` would).
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
README = REPO / "README.md"
LOCK_IN = REPO / "cluster" / "requirements.in"
LOCK = REPO / "cluster" / "requirements.txt"
PINNED = ("ray", "torch", "torchvision")

# The lock-down (README, "How the cluster is locked down").
NETWORK = "raysearch"  # the VPC network and its subnet, both named so in README step 1
NETWORK_TAG = "raysearch"  # every node's network tag: the firewall rule's source and target
TOKEN_SECRET = "raysearch-ray-token"  # the Secret Manager secret holding the Ray token
TOKEN_FILE = "~/.ray/auth_token"  # where the nodes keep it: Ray's default token path
HEAD_ACCOUNT = "ray-autoscaler-sa-v1"  # the account `ray up` gives the head
WORKER_ACCOUNT = "raysearch-worker"
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
STORAGE_SCOPES = {
    "https://www.googleapis.com/auth/devstorage.read_write",
    "https://www.googleapis.com/auth/devstorage.read_only",
}

# GCP machine types this file may use: vCPUs, and the GPUs that come with the machine type or
# that it is meant to carry here. Add a row when cluster.yaml gains a machine type.
MACHINE_TYPES: dict[str, dict[str, Any]] = {
    "n2-standard-4": {"cpus": 4, "gpu": None, "gpus": 0},
    "n2-standard-8": {"cpus": 8, "gpu": None, "gpus": 0},
    "g2-standard-8": {"cpus": 8, "gpu": "nvidia-l4", "gpus": 1},
    "g2-standard-24": {"cpus": 24, "gpu": "nvidia-l4", "gpus": 2},
    "n1-standard-8": {"cpus": 8, "gpu": "nvidia-tesla-t4", "gpus": None},  # 1, 2 or 4 T4s
    "a2-highgpu-1g": {"cpus": 12, "gpu": "nvidia-tesla-a100", "gpus": 1},
    "a2-highgpu-2g": {"cpus": 24, "gpu": "nvidia-tesla-a100", "gpus": 2},
    "a2-highgpu-4g": {"cpus": 48, "gpu": "nvidia-tesla-a100", "gpus": 4},
}


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict[str, Any]:
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(copy.deepcopy(raw))


def node_types(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return cfg["available_node_types"]


def gpu_count(node_type: dict[str, Any]) -> int:
    accelerators = node_type["node_config"].get("guestAccelerators") or []
    return sum(int(a["acceleratorCount"]) for a in accelerators)


def gpu_types(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Worker types that have or claim a GPU in any way."""
    out = {}
    for name, nt in node_types(cfg).items():
        machine = MACHINE_TYPES.get(nt["node_config"].get("machineType"), {})
        if nt.get("resources", {}).get("GPU") or gpu_count(nt) or machine.get("gpu"):
            out[name] = nt
    return out


# ----------------------------------------------------------------------------- Ray's validator


def test_passes_ray_validator(prepared):
    from ray.autoscaler._private.util import validate_config

    validate_config(prepared)


@pytest.mark.parametrize(
    "break_it",
    [
        lambda c: c.update(idle_timout_minutes=5),  # typo: unknown top-level key
        lambda c: c.update(head_node_type="no_such_type"),
        lambda c: c["available_node_types"]["head"].update(resources={"CPU": "one"}),
    ],
    ids=["unknown-key", "unknown-head-type", "bad-resource-value"],
)
def test_ray_validator_rejects_broken_copies(raw, break_it):
    """Guards the test above: the validator really looks at this file's structure."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(raw)
    break_it(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_config(prepare_config(broken))


# ----------------------------------------------------------------------------- node types


def test_every_machine_type_is_known(raw):
    unknown = {
        name: nt["node_config"].get("machineType")
        for name, nt in node_types(raw).items()
        if nt["node_config"].get("machineType") not in MACHINE_TYPES
    }
    assert not unknown, f"add these machine types to MACHINE_TYPES: {unknown}"


def test_head_has_no_gpu_and_room_only_for_trial_drivers(raw):
    head = node_types(raw)[raw["head_node_type"]]
    machine = MACHINE_TYPES[head["node_config"]["machineType"]]

    assert not head["resources"].get("GPU"), "the head must not advertise a GPU"
    assert not head["node_config"].get("guestAccelerators"), "the head must carry no GPU"
    assert machine["gpu"] is None
    # Trial drivers ask for {"CPU": 0.01}: a few must fit, but less than the whole machine, so
    # the head keeps CPUs for the Ray services and the tune driver process.
    assert 0.01 <= head["resources"]["CPU"] < machine["cpus"]
    assert head.get("max_workers", 0) == 0


def test_gpu_types_declare_accelerators_that_match_resources_and_machine(raw):
    types = gpu_types(raw)
    assert types, "cluster.yaml has no GPU worker type"
    for name, nt in types.items():
        cfg = nt["node_config"]
        machine = MACHINE_TYPES[cfg["machineType"]]
        accelerators = cfg.get("guestAccelerators")
        assert accelerators, f"{name}: GPU node type without guestAccelerators"
        assert {a["acceleratorType"] for a in accelerators} == {machine["gpu"]}, name
        assert nt["resources"].get("GPU") == gpu_count(nt), (
            f"{name}: resources.GPU={nt['resources'].get('GPU')} but "
            f"guestAccelerators attach {gpu_count(nt)}"
        )
        if machine["gpus"] is not None:
            assert gpu_count(nt) == machine["gpus"], f"{name}: {cfg['machineType']} GPU count"
        assert nt["resources"].get("CPU") == machine["cpus"], f"{name}: CPU count"


def test_gpu_types_terminate_on_maintenance_and_install_the_driver(raw):
    for name, nt in gpu_types(raw).items():
        cfg = nt["node_config"]
        assert cfg.get("scheduling", {}).get("onHostMaintenance") == "TERMINATE", name
        metadata = {i["key"]: i["value"] for i in cfg.get("metadata", {}).get("items", [])}
        assert str(metadata.get("install-nvidia-driver")).lower() == "true", name
        image = cfg["disks"][0]["initializeParams"]["sourceImage"]
        assert "deeplearning-platform-release" in image, f"{name}: not a Deep Learning VM image"


def test_a_single_gpu_type_and_a_larger_a100_type(raw):
    types = gpu_types(raw)
    assert any(gpu_count(nt) == 1 for nt in types.values())
    assert any(
        "a100" in a["acceleratorType"]
        for nt in types.values()
        for a in nt["node_config"]["guestAccelerators"]
    )


def test_worker_counts_and_idle_timeout(raw):
    workers = {n: nt for n, nt in node_types(raw).items() if n != raw["head_node_type"]}
    for name, nt in workers.items():
        assert 0 <= nt["min_workers"] <= nt["max_workers"] <= raw["max_workers"], name
    assert any(nt["max_workers"] > 0 for nt in workers.values()), "no worker type can start"
    assert raw["idle_timeout_minutes"] > 0


def test_workers_reach_gcs_through_a_placeholder_service_account(raw):
    for name, nt in gpu_types(raw).items():
        accounts = nt["node_config"].get("serviceAccounts")
        assert accounts, f"{name}: no service account, so no GCS access"
        for account in accounts:
            assert "YOUR_GCP_PROJECT" in account["email"], account["email"]
            assert "https://www.googleapis.com/auth/devstorage.read_write" in account["scopes"], (
                f"{name}: workers write checkpoints, so they need devstorage.read_write"
            )
    assert raw["provider"]["project_id"] == "YOUR_GCP_PROJECT"


def max_cluster_gpus(cfg: dict[str, Any]) -> int:
    """Most GPUs the autoscaler can bring up: the GPU-richest nodes first, within max_workers."""
    per_node = sorted(
        (
            nt["resources"].get("GPU", 0)
            for nt in gpu_types(cfg).values()
            for _ in range(nt["max_workers"])
        ),
        reverse=True,
    )
    return int(sum(per_node[: cfg["max_workers"]]))


def test_the_mura_search_fits_the_cluster(raw):
    """search_spaces/mura.yaml is the search meant for this cluster: its trials must fit."""
    res = yaml.safe_load((REPO / "search_spaces" / "mura.yaml").read_text())["resources"]
    gpus, cpus = res["gpus_per_worker"], res["cpus_per_worker"]
    workers = res.get("workers_per_trial", 1)

    assert res["max_concurrent"] * workers * gpus <= max_cluster_gpus(raw), (
        f"mura.yaml runs {res['max_concurrent']} trials x {workers} x {gpus} GPU; cluster.yaml "
        f"brings up at most {max_cluster_gpus(raw)} GPUs"
    )
    # Each Train worker (a GPU and its CPUs) must fit on one node of an enabled GPU type.
    assert any(
        nt["max_workers"] > 0
        and nt["resources"]["GPU"] >= gpus
        and nt["resources"]["CPU"] / nt["resources"]["GPU"] * gpus >= cpus
        for nt in gpu_types(raw).values()
    ), f"no enabled GPU node type fits a worker of {gpus} GPU + {cpus} CPUs"


# ----------------------------------------------------------------------------- software


def pinned_requirements(lines: list[str]) -> dict[str, Requirement]:
    """Requirements with a version specifier among shell words or requirement lines, by name."""
    out: dict[str, Requirement] = {}
    for line in lines:
        for token in shlex.split(line, comments=True):
            try:
                req = Requirement(token)
            except InvalidRequirement:
                continue
            if req.specifier:
                out[canonicalize_name(req.name)] = req
    return out


def pyproject_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    return {canonicalize_name(r.name): r for r in reqs}


def lock_entries() -> dict[str, tuple[str, list[str]]]:
    """cluster/requirements.txt: name -> (exact version, sha256 hashes)."""
    text = LOCK.read_text().replace("\\\n", " ")
    out = {}
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        words = line.split()
        req = Requirement(words[0])
        (spec,) = req.specifier
        assert spec.operator == "==", f"lock entry not pinned exactly: {words[0]}"
        hashes = [w.split(":", 1)[1] for w in words[1:] if w.startswith("--hash=sha256:")]
        out[canonicalize_name(req.name)] = (spec.version, hashes)
    return out


def install_commands(cfg: dict[str, Any], section: str = "worker_setup_commands") -> list[str]:
    return [c for c in cfg[section] if re.search(r"\bpip install\b", c)]


def test_lock_pins_every_package_with_hashes():
    entries = lock_entries()
    assert len(entries) > 50, "cluster/requirements.txt should lock the whole dependency tree"
    for name, (version, hashes) in entries.items():
        assert hashes, f"{name}=={version} has no --hash in cluster/requirements.txt"
        assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), name


def test_lock_agrees_with_pyproject_and_requirements_in():
    entries = lock_entries()
    wanted = {**pyproject_requirements(), **pinned_requirements(LOCK_IN.read_text().splitlines())}
    for name, req in wanted.items():
        assert name in entries, f"{name} is required but not in cluster/requirements.txt: re-lock"
        version = entries[name][0]
        assert req.specifier.contains(version, prereleases=True), (
            f"cluster/requirements.txt has {name}=={version}, outside {req}: re-lock"
        )


def test_setup_pins_match_pyproject():
    pins = pinned_requirements(LOCK_IN.read_text().splitlines())
    locked = lock_entries()
    declared = pyproject_requirements()
    for name in PINNED:
        assert name in pins, f"cluster/requirements.in does not pin {name}"
        pin, spec = pins[name], declared[name]
        (exact,) = [s for s in pin.specifier if s.operator == "=="]
        assert exact.version in spec.specifier, f"{pin} is outside pyproject's {spec}"
        assert pin.extras == spec.extras, f"{pin} has other extras than pyproject's {spec}"
        assert locked[name][0] == exact.version, f"the lock has {name}=={locked[name][0]}"
    # Ray must be the very version pyproject pins: head, workers and client must agree.
    assert str(pins["ray"].specifier) == str(declared["ray"].specifier)


def test_head_and_workers_run_the_same_setup(prepared):
    common = prepared["setup_commands"]
    assert prepared["head_setup_commands"][: len(common)] == common
    assert prepared["worker_setup_commands"][: len(common)] == common


def test_packages_come_from_the_hashed_lock_then_raysearch_without_deps(raw, prepared):
    (remote,) = [r for r, local in raw["file_mounts"].items() if local in (".", "./")]
    lock_on_node = f"{remote}/{LOCK.relative_to(REPO).as_posix()}"
    for section in ("head_setup_commands", "worker_setup_commands"):
        installs = [shlex.split(c) for c in install_commands(prepared, section)]
        assert len(installs) == 2, f"{section}: expected the lock install, then raysearch"
        locked, editable = installs
        assert "--require-hashes" in locked, f"{section}: install the lock with --require-hashes"
        assert any(locked[k : k + 2] == ["-r", lock_on_node] for k in range(len(locked))), (
            f"{section}: the first install must be `-r {lock_on_node}`"
        )
        # raysearch from the synced repo, with nothing resolved past the lock.
        assert editable[-2:] == ["-e", remote]
        assert {"--no-deps", "--no-build-isolation"} <= set(editable), section
    # No other install anywhere (start commands included).
    everywhere = [c for c in all_commands(prepared) if re.search(r"\bpip3? install\b", c)]
    assert len(everywhere) == 4, everywhere


def test_dashboard_is_not_exposed(prepared):
    (params, _, explicit) = ray_start(prepared["head_start_ray_commands"])
    assert "dashboard_host" in explicit and params["dashboard_host"] == "127.0.0.1"
    assert "0.0.0.0" not in CLUSTER_YAML.read_text()


# ----------------------------------------------------------------------------- lock-down


SHELL_SECTIONS = (
    "initialization_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)
PORT_PARAMS = (
    "object_manager_port",
    "node_manager_port",
    "dashboard_agent_grpc_port",
    "runtime_env_agent_port",
    "metrics_export_port",
    "dashboard_agent_listen_port",
    "min_worker_port",
    "max_worker_port",
)


def all_commands(cfg: dict[str, Any]) -> list[str]:
    return [c for section in SHELL_SECTIONS for c in cfg.get(section) or []]


def ray_start(commands: list[str]) -> tuple[dict[str, Any], dict[str, str], set[str]]:
    """The one `ray start` among commands, parsed by Ray's own CLI definition.

    Returns its parameters (defaults filled in), the environment assignments in front of it,
    and the names of the parameters given explicitly.
    """
    from click.core import ParameterSource
    from ray.scripts.scripts import start as ray_start_cli

    found = []
    for command in commands:
        lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = list(lexer)
        for k in range(len(words) - 1):
            if words[k : k + 2] != ["ray", "start"]:
                continue
            env, b = {}, k - 1
            while b >= 0 and re.fullmatch(r"[A-Za-z_]\w*=.*", words[b]):
                name, value = words[b].split("=", 1)
                env[name] = value
                b -= 1
            args = []
            for word in words[k + 2 :]:
                if word in (";", "&&", "||", "|", "&"):
                    break
                args.append(word)
            found.append((env, args))
    assert len(found) == 1, f"expected one `ray start`, found {len(found)}"
    env, args = found[0]
    ctx = ray_start_cli.make_context("start", args)
    explicit = {
        name for name in ctx.params if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE
    }
    return ctx.params, env, explicit


def pinned_ports(cfg: dict[str, Any]) -> set[int]:
    head, _, _ = ray_start(cfg["head_start_ray_commands"])
    ports = {head["port"]}
    ports |= {head[p] for p in PORT_PARAMS if p not in ("min_worker_port", "max_worker_port")}
    ports |= set(range(head["min_worker_port"], head["max_worker_port"] + 1))
    return ports


def test_ray_s_token_auth_is_what_this_file_assumes(monkeypatch):
    """The facts of the installed Ray that the cluster relies on (see cluster.yaml's comments)."""
    from ray._private.authentication import authentication_token_setup as setup

    assert setup.AUTH_MODE_ENV_VAR == "RAY_AUTH_MODE"
    monkeypatch.setenv("HOME", "/home/ubuntu")
    assert setup._get_default_token_path() == Path(os.path.expanduser(TOKEN_FILE))


@pytest.mark.parametrize("section", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_every_ray_start_runs_with_token_auth(prepared, section):
    _, env, _ = ray_start(prepared[section])
    assert env.get("RAY_AUTH_MODE") == "token", (
        f"{section}: `ray start` must run with RAY_AUTH_MODE=token (a worker never turns it on "
        "by itself, and a node without it cannot talk to one with it)"
    )
    # The token comes from the default file on every node, not from the environment.
    assert "RAY_AUTH_TOKEN" not in env and "RAY_AUTH_TOKEN_PATH" not in env
    for command in all_commands(prepared):
        for mode in re.findall(r"RAY_AUTH_MODE=(\S+)", command):
            assert mode.strip("'\"") == "token", command


def test_head_fetches_the_token_from_secret_manager_before_starting_ray(prepared):
    commands = prepared["head_setup_commands"] + prepared["head_start_ray_commands"]
    fetch = re.compile(
        rf"gcloud secrets versions access latest --secret={re.escape(TOKEN_SECRET)}\s*>\s*(\S+)"
    )
    fetches = [(i, c) for i, c in enumerate(commands) if fetch.search(c)]
    assert len(fetches) == 1, f"the head must fetch the token from Secret Manager ({TOKEN_SECRET})"
    at, command = fetches[0]
    start_at = next(i for i, c in enumerate(commands) if re.search(r"\bray start\b", c))
    assert at < start_at, "the token must be in place before `ray start`"

    # Written to a file only its owner can read, and that file ends up at Ray's token path.
    written = fetch.search(command).group(1)
    assert written.startswith("~/.ray/"), written
    umask = command.find("umask 077")
    assert 0 <= umask < command.find("gcloud secrets"), "create the token file under umask 077"
    if written != TOKEN_FILE:
        assert re.search(rf"\bmv -f {re.escape(written)} {re.escape(TOKEN_FILE)}\b", command)
    assert f"chmod 600 {TOKEN_FILE}" in command

    # Never on the terminal, in a log, on a command line or in the environment.
    for leak in ("echo", "cat ", "tee", "set -x", "$(gcloud", "`gcloud", "RAY_AUTH_TOKEN="):
        assert leak not in command, f"the token fetch must not use {leak!r}"


def test_workers_get_the_token_from_the_head(raw, prepared):
    assert TOKEN_FILE in raw.get("cluster_synced_files", []), (
        "workers have no Secret Manager scope: the head must sync them the token file"
    )
    worker = prepared["worker_setup_commands"] + prepared["worker_start_ray_commands"]
    assert not any("gcloud secrets" in c for c in worker), (
        "workers cannot read Secret Manager without the cloud-platform scope"
    )
    start = prepared["worker_start_ray_commands"]
    check_at = next(i for i, c in enumerate(start) if f"test -s {TOKEN_FILE}" in c)
    start_at = next(i for i, c in enumerate(start) if re.search(r"\bray start\b", c))
    assert check_at < start_at and f"chmod 600 {TOKEN_FILE}" in start[check_at]


def tracked_text_files() -> list[Path]:
    try:
        names = subprocess.run(
            ["git", "-C", str(REPO), "ls-files"], capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout
        names = [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file()]
    out = []
    for name in names:
        path = REPO / name
        if path.is_file() and path.suffix not in {".parquet", ".png", ".jpg", ".pt", ".gz"}:
            out.append(path)
    return out


def test_no_token_in_the_yaml_or_the_repository(raw):
    # The one source of the token is the secret that README step 1 creates from stdin.
    text = CLUSTER_YAML.read_text()
    assert f"--secret={TOKEN_SECRET}" in text
    readme = README.read_text()
    assert re.search(
        rf"secrets\.token_urlsafe\(\d+\)\)'\s*\|\s*gcloud secrets create {TOKEN_SECRET}\b"
        r"[^\n]*--data-file=-",
        readme,
    ), "README must create the secret from a random token piped through stdin"
    # No node makes up its own token (nodes would disagree) or takes one from the environment.
    assert "get-auth-token" not in text and "RAY_AUTH_TOKEN=" not in text
    literal = re.compile(r"RAY_AUTH_TOKEN\s*[=:]\s*['\"]?[A-Za-z0-9_\-]{8,}")
    for path in tracked_text_files():
        assert path.name not in ("auth_token", "ray-token"), f"token file in the repo: {path}"
        body = path.read_text(errors="ignore")
        assert not literal.search(body), f"{path.relative_to(REPO)} sets a literal Ray token"


def test_every_node_type_has_the_network_tag_and_the_cluster_s_subnet(raw):
    subnet = f"regions/{raw['provider']['region']}/subnetworks/{NETWORK}"
    for name, nt in node_types(raw).items():
        cfg = nt["node_config"]
        assert NETWORK_TAG in cfg.get("tags", {}).get("items", []), (
            f"{name}: no `{NETWORK_TAG}` network tag, so the Ray firewall rule does not cover it"
        )
        interfaces = cfg.get("networkInterfaces") or []
        assert [i.get("subnetwork") for i in interfaces] == [subnet], (
            f"{name}: must sit in the cluster's own subnet {subnet}, not the default network"
        )


def test_ray_ports_are_pinned_alike_on_head_and_workers(prepared):
    head, _, head_explicit = ray_start(prepared["head_start_ray_commands"])
    worker, _, worker_explicit = ray_start(prepared["worker_start_ray_commands"])
    assert "port" in head_explicit
    for name in PORT_PARAMS:
        flag = "--" + name.replace("_", "-")
        assert name in head_explicit and name in worker_explicit, f"{flag} is not pinned"
        assert head[name] == worker[name] and head[name], name
    assert worker["address"] == f"$RAY_HEAD_IP:{head['port']}"
    fixed = [head["port"]] + [head[n] for n in PORT_PARAMS if "worker_port" not in n]
    assert len(set(fixed)) == len(fixed), f"two services on one port: {fixed}"
    assert not any(head["min_worker_port"] <= p <= head["max_worker_port"] for p in fixed)


def shell_commands(text: str, prefix: str) -> list[list[str]]:
    """Commands in README's code blocks that start with prefix, continuation lines joined."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        joined = re.sub(r"\\\n\s*", " ", block)
        joined = re.sub(r"\|\n\s*", "| ", joined)
        for line in joined.splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith(prefix):
                out.append(shlex.split(line))
    return out


def flags(words: list[str]) -> dict[str, str]:
    return dict(w[2:].split("=", 1) for w in words if w.startswith("--") and "=" in w)


def allowed_ports(allow: str) -> set[int]:
    ports = set()
    for item in allow.split(","):
        proto, _, spec = item.partition(":")
        assert proto == "tcp", f"unexpected protocol in --allow: {item}"
        lo, _, hi = spec.partition("-")
        ports |= set(range(int(lo), int(hi or lo) + 1))
    return ports


def test_readme_firewall_rule_opens_exactly_the_pinned_ports_between_tagged_nodes(prepared):
    readme = README.read_text()
    rules = {
        words[4]: flags(words)
        for words in shell_commands(readme, "gcloud compute firewall-rules create")
    }
    ray_rules = {
        name: r for name, r in rules.items() if allowed_ports(r["allow"]) & pinned_ports(prepared)
    }
    assert len(ray_rules) == 1, f"expected one firewall rule for the Ray ports, got {ray_rules}"
    ((name, rule),) = ray_rules.items()
    assert allowed_ports(rule["allow"]) == pinned_ports(prepared), (
        f"{name} must open exactly the ports pinned in the `ray start` commands"
    )
    assert rule["source-tags"] == NETWORK_TAG and rule["target-tags"] == NETWORK_TAG, name
    assert "source-ranges" not in rule, f"{name}: Ray ports only from the cluster's own nodes"
    assert rule.get("direction", "INGRESS") == "INGRESS" and rule["network"] == NETWORK

    # Everything else lets in SSH only, into the cluster's nodes, from nowhere wider.
    for other, r in rules.items():
        assert r["network"] == NETWORK and r["target-tags"] == NETWORK_TAG, other
        if other != name:
            assert allowed_ports(r["allow"]) == {22}, other
        assert "0.0.0.0/0" not in r.get("source-ranges", ""), other

    # The network and the subnet the nodes name exist, with no rule but these.
    assert ["gcloud", "compute", "networks", "create", NETWORK, "--subnet-mode=custom"] in (
        shell_commands(readme, "gcloud compute networks create")
    )
    subnets = shell_commands(readme, "gcloud compute networks subnets create")
    assert any(w[5] == NETWORK and flags(w)["network"] == NETWORK for w in subnets), subnets


def test_no_node_has_the_cloud_platform_scope(raw):
    for name, nt in node_types(raw).items():
        for account in nt["node_config"].get("serviceAccounts", []):
            scopes = set(account["scopes"])
            assert CLOUD_PLATFORM not in scopes, f"{name}: cloud-platform scope"
            assert scopes <= STORAGE_SCOPES, f"{name}: scopes beyond Cloud Storage: {scopes}"


def test_readme_grants_one_bucket_to_workers_and_one_secret_to_the_head():
    readme = README.read_text()
    bindings = shell_commands(readme, "gcloud ")
    worker = f"serviceAccount:{WORKER_ACCOUNT}@$PROJECT.iam.gserviceaccount.com"
    head = f"serviceAccount:{HEAD_ACCOUNT}@$PROJECT.iam.gserviceaccount.com"
    grants = [(w[:4], flags(w)) for w in bindings if any("add-iam-policy-binding" in x for x in w)]
    assert (
        ["gcloud", "storage", "buckets", "add-iam-policy-binding"],
        {"member": worker, "role": "roles/storage.objectAdmin"},
    ) in grants
    assert (
        ["gcloud", "secrets", "add-iam-policy-binding", TOKEN_SECRET],
        {"member": head, "role": "roles/secretmanager.secretAccessor"},
    ) in grants
    for words, f in grants:
        if f.get("member") == worker:
            assert words[:3] == ["gcloud", "storage", "buckets"], f"{WORKER_ACCOUNT}: {words}"


PIPE_TO_SHELL = re.compile(
    r"\|\s*(sudo\s+(-\S+\s+)*)?(env\s+)?(\w+=\S*\s+)*(/usr)?(/bin/)?(ba|z|da|k|fi)?sh\b"
    r"|\b(ba|z|da)?sh\s+(-c\s+)?['\"]?(<\(|\$\()\s*(curl|wget)\b"
    r"|\bsource\s+<\(\s*(curl|wget)\b"
)


@pytest.mark.parametrize(
    "command",
    [
        "curl -LsSf https://astral.sh/uv/install.sh | sh",
        "wget -qO- https://example.org/get.sh | sudo bash",
        "curl -fsSL https://example.org/x | sudo -E bash -s --",
        'sh -c "$(curl -fsSL https://example.org/install.sh)"',
        "bash <(curl -s https://example.org/install.sh)",
        "curl https://example.org/x.sh | env FOO=1 sh",
    ],
)
def test_pipe_to_shell_pattern_catches_examples(command):
    assert PIPE_TO_SHELL.search(command), command


def test_nothing_is_piped_into_a_shell(prepared):
    for command in all_commands(prepared):
        assert not PIPE_TO_SHELL.search(command), f"pipes a download into a shell: {command}"


def test_every_download_is_pinned_and_checked_before_use(prepared):
    downloads = 0
    for command in all_commands(prepared):
        for match in re.finditer(r"\b(curl|wget)\b", command):
            downloads += 1
            rest = command[match.start() :]
            words = shlex.split(rest.split("&&", 1)[0])
            urls = [w for w in words if "://" in w]
            assert len(urls) == 1 and urls[0].startswith("https://"), words
            assert "latest" not in urls[0] and not urls[0].endswith(".sh"), urls[0]
            out = words[words.index("-o") + 1] if "-o" in words else None
            assert out, f"download to a named file, then check it: {words}"
            check = re.search(
                r'echo\s+"([0-9a-f]{64})\s+(\S+)"\s*\|\s*sha256sum\s+(-c|--check)\s+-', rest
            )
            assert check and check.group(2) == out, (
                f"{urls[0]} is not followed by a sha256sum check of {out}"
            )
            # The first thing that touches the download after curl writes it is the check.
            next_use = rest.find(out, rest.index(out) + len(out))
            assert check.start() <= next_use < check.end(), f"{out} is used before its check"
            # The version in the URL is the one the command looks for and unpacks.
            version = re.search(r"-(\d+\.\d+\.\d+)-", urls[0]).group(1)
            assert re.escape(version) in command and f"-{version}.data/" in rest, version
    assert downloads, "expected the pinned uv download"


CREDENTIAL_PATTERNS = {
    "private key field": re.compile(r"private_key", re.IGNORECASE),
    "PEM private key": re.compile(r"BEGIN [A-Z ]*PRIVATE KEY"),
    "AWS access key id": re.compile(r"AKIA[0-9A-Z]{16}"),
    "Google API key": re.compile(r"AIza[0-9A-Za-z_\-]{35}"),
    "Google OAuth token": re.compile(r"ya29\.[0-9A-Za-z_\-]+"),
    "key file": re.compile(r"\.(json|pem|p12)\b"),
    "secret-looking field": re.compile(
        r"^\s*[\w-]*(token|secret|password|passwd|api_key|apikey)[\w-]*\s*:\s*\S",
        re.IGNORECASE | re.MULTILINE,
    ),
}


def test_no_credentials(raw):
    text = CLUSTER_YAML.read_text()
    found = [what for what, pattern in CREDENTIAL_PATTERNS.items() if pattern.search(text)]
    assert not found, f"cluster.yaml looks like it holds credentials: {found}"
    assert "ssh_private_key" not in raw.get("auth", {})


@pytest.mark.parametrize(
    "line",
    [
        "  ssh_private_key: ~/.ssh/id_rsa",
        "-----BEGIN RSA PRIVATE KEY-----",
        "aws: AKIAABCDEFGHIJKLMNOP",
        "  token: abc123",
        "  credentials: /home/me/sa-key.json",
    ],
)
def test_credential_patterns_catch_examples(line):
    assert any(p.search(line) for p in CREDENTIAL_PATTERNS.values()), line


def test_readme_explains_the_lock_down_and_the_local_token():
    readme = README.read_text()
    section = readme.split("### How the cluster is locked down\n", 1)[1].split("\n### ", 1)[0]
    bullets = [line for line in section.splitlines() if line.startswith("- ")]
    assert 5 <= len(bullets) <= 8, f"{len(bullets)} bullets in 'How the cluster is locked down'"
    # Your machine needs the token for `ray job submit` and the dashboard: token mode, and the
    # token in a file only you can read, from the same secret.
    assert re.search(
        rf"umask 077 && gcloud secrets versions access latest --secret={TOKEN_SECRET}\s*"
        r"\\?\s*>\s*(~/\S+)",
        readme,
    ), "README must show how to fetch the token into a private file"
    token_file = re.search(rf"--secret={TOKEN_SECRET}\s*\\?\s*>\s*(~/\S+)", readme).group(1)
    assert not token_file.startswith("~/raysearch"), "keep the token file out of the repo"
    assert f"export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={token_file}" in readme
