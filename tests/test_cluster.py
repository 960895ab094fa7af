"""Tests for the cluster stage: cluster.yaml (Ray cluster launcher, GCP), checked offline.

Ray's own validator covers the schema; the rest of this file checks what the schema cannot see,
because GCP ``node_config`` is free-form: GPU declarations, driver install, versions, secrets.
Nothing here talks to GCP (``bootstrap_config`` would).
"""

from __future__ import annotations

import copy
import re
import shlex
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
PINNED = ("ray", "torch", "torchvision")

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
            assert set(account["scopes"]) & {
                "https://www.googleapis.com/auth/cloud-platform",
                "https://www.googleapis.com/auth/devstorage.read_write",
                "https://www.googleapis.com/auth/devstorage.full_control",
            }, name
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


def pinned_requirements(commands: list[str]) -> dict[str, Requirement]:
    """Requirements with a version specifier found in shell commands, by package name."""
    out: dict[str, Requirement] = {}
    for command in commands:
        for token in shlex.split(command, comments=False):
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


def test_setup_pins_match_pyproject(prepared):
    pins = pinned_requirements(prepared["worker_setup_commands"])
    declared = pyproject_requirements()
    for name in PINNED:
        assert name in pins, f"setup_commands do not pin {name}"
        pin, spec = pins[name], declared[name]
        (exact,) = [s for s in pin.specifier if s.operator == "=="]
        assert exact.version in spec.specifier, f"{pin} is outside pyproject's {spec}"
        assert pin.extras == spec.extras, f"{pin} has other extras than pyproject's {spec}"
    # Ray must be the very version pyproject pins: head, workers and client must agree.
    assert str(pins["ray"].specifier) == str(declared["ray"].specifier)


def test_head_and_workers_run_the_same_setup(prepared):
    common = prepared["setup_commands"]
    assert prepared["head_setup_commands"][: len(common)] == common
    assert prepared["worker_setup_commands"][: len(common)] == common


def test_raysearch_is_installed_from_the_synced_repo_with_the_pins(raw):
    (remote,) = [r for r, local in raw["file_mounts"].items() if local in (".", "./")]
    installs = [c for c in raw["setup_commands"] if f"-e {remote}" in c]
    assert installs, f"no setup command installs raysearch from {remote}"
    # One resolver run for raysearch and the pins, so nothing upgrades them afterwards.
    assert set(pinned_requirements(installs)) >= set(PINNED)


def test_dashboard_is_not_exposed(raw):
    start = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start or "--dashboard-host" not in start
    assert "0.0.0.0" not in CLUSTER_YAML.read_text()


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
