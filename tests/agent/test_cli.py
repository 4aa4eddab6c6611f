"""``ember-agent``: one clear error line and exit status 2 for bad configs and datasets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from agent import __version__
from agent.cli import cli
from tests.agent.conftest import REPO, make_npz


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(f'[agent]\nid = "pi-cli"\nstate_dir = "{tmp_path / "state"}"\n{body}')
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The agent's CLI as a user runs it: a separate process."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_version() -> None:
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('[broker]\nurl = "http://broker"\n', "error: broker.url: broker url 'http://broker'"),
        ("[broker\n", "error: config: "),
        ("[[datasets]]\nname = 'd'\npath = 'missing.npz'\n", "error: dataset d: "),
    ],
)
def test_run_with_a_bad_config_or_dataset_exits_2_with_one_line(
    tmp_path: Path, body: str, message: str
) -> None:
    done = run_cli("run", "--config", str(write(tmp_path, body)))
    assert done.returncode == 2
    assert done.stderr.startswith(message), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr


def test_missing_config_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["run", "--config", str(tmp_path / "none.toml")])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: config: {tmp_path / 'none.toml'} does not exist"


def test_datasets_check(tmp_path: Path) -> None:
    good = make_npz(tmp_path / "good.npz", samples=50)
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.ones((3, 2)), y=np.ones(2))
    config = write(
        tmp_path,
        f"[[datasets]]\nname = 'good'\npath = '{good}'\n"
        f"[[datasets]]\nname = 'bad'\npath = '{bad}'\n",
    )
    result = CliRunner().invoke(cli, ["datasets", "check", "--config", str(config)])
    assert result.exit_code == 2
    assert "ok  good: 50 samples, features [8] float32, 3 labels" in result.stdout
    assert "BAD bad: x has 3 samples but y has 2" in result.stdout
    assert result.stderr.strip() == "error: dataset bad: x has 3 samples but y has 2"

    only_good = write(tmp_path, f"[[datasets]]\nname = 'good'\npath = '{good}'\n")
    result = CliRunner().invoke(cli, ["datasets", "check", "-c", str(only_good)])
    assert result.exit_code == 0, result.output


def test_info_prints_the_document(tmp_path: Path) -> None:
    data = make_npz(tmp_path / "d.npz", samples=33)
    config = write(
        tmp_path,
        f"labels = {{ site = 'lab' }}\n[[datasets]]\nname = 'digits'\npath = '{data}'\n"
        "tags = ['vision']\n",
    )
    done = run_cli("info", "--config", str(config))
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["agent"] == "pi-cli"
    assert document["labels"] == {"site": "lab"}
    assert document["datasets"][0]["samples"] == 33
    assert document["runtimes"]["onnxruntime"]["providers"]
