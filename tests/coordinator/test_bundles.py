"""Coordinator keys, model artifacts from a spec, and deterministic signed bundles."""

from __future__ import annotations

import stat
import textwrap
from pathlib import Path

import numpy as np
import pytest

from agent.protocol.bundle import key_id, public_key_from_text, verify_bundle
from agent.protocol.codec import decode_tensors, encode_tensors
from coordinator.bundles import (
    KeyFileError,
    build_bundle,
    check_artifacts,
    init_key,
    key_path,
    load_key,
    model_artifacts,
    public_text,
    sign,
)
from coordinator.spec import SpecError, parse_spec


def test_key_init_load_and_force(tmp_path: Path) -> None:
    key, created = init_key(tmp_path)
    assert created
    assert stat.S_IMODE(key_path(tmp_path).stat().st_mode) == 0o600
    again, created = init_key(tmp_path)
    assert not created
    assert public_text(again) == public_text(key)
    assert public_text(load_key(tmp_path)) == public_text(key)
    text = public_text(key)
    assert text.startswith("ed25519:")
    assert key_id(public_key_from_text(text)) == key_id(key.public_key())
    rotated, created = init_key(tmp_path, force=True)
    assert created
    assert public_text(rotated) != text


def test_key_errors(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="ember keys init"):
        load_key(tmp_path)
    key_path(tmp_path).write_text("not a key")
    with pytest.raises(KeyFileError, match="not an unencrypted PEM private key"):
        load_key(tmp_path)


def onnx_spec(onnx: object) -> object:
    return parse_spec(
        {"name": "j", "model": {"onnx": onnx}, "data": {"dataset": "d"}, "stop": {"max_updates": 1}}
    )


def test_onnx_files_are_read_relative_to_the_job_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "train_step.onnx").write_bytes(b"train")
    (out / "eval.onnx").write_bytes(b"eval")
    np.savez(out / "weights.npz", w=np.ones((2, 3), np.float32), b=np.zeros(3, np.float32))
    spec = onnx_spec(
        {"train_step": "out/train_step.onnx", "eval": "out/eval.onnx", "initial": "out/weights.npz"}
    )
    built = model_artifacts(spec, tmp_path)  # type: ignore[arg-type]
    assert built.artifacts["train_step.onnx"] == b"train"
    weights = decode_tensors(built.artifacts["initial.tensors"])
    assert weights["w"].shape == (2, 3)
    assert weights["b"].shape == (3,)
    check_artifacts(built.artifacts)


def test_onnx_shorthand_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "train_step.onnx").write_bytes(b"train")
    (tmp_path / "eval.onnx").write_bytes(b"eval")
    spec = onnx_spec("train_step.onnx")
    with pytest.raises(SpecError, match=r"^model.onnx.initial: file not found: initial.tensors$"):
        model_artifacts(spec, tmp_path)  # type: ignore[arg-type]
    (tmp_path / "initial.tensors").write_bytes(b"garbage")
    with pytest.raises(SpecError, match=r"^model.onnx.initial: not tensor-codec weights"):
        model_artifacts(spec, tmp_path)  # type: ignore[arg-type]
    (tmp_path / "initial.tensors").write_bytes(encode_tensors({"w": np.ones(2, np.float32)}))
    assert set(model_artifacts(spec, tmp_path).artifacts) == {  # type: ignore[arg-type]
        "train_step.onnx",
        "eval.onnx",
        "initial.tensors",
    }
    with pytest.raises(SpecError, match=r"^model: artifacts missing: eval.onnx$"):
        check_artifacts({"train_step.onnx": b"x", "initial.tensors": b"y"})


def torch_spec(ref: str, **model: object) -> object:
    return parse_spec(
        {
            "name": "j",
            "model": {"torch": ref, **model},
            "data": {"dataset": "d"},
            "stop": {"max_updates": 1},
        }
    )


def test_torch_model_problems_name_the_field(tmp_path: Path) -> None:
    (tmp_path / "m.py").write_text("import torch\nclass Net(torch.nn.Module):\n    pass\n")
    (tmp_path / "broken.py").write_text("raise RuntimeError('nope')\n")
    cases: list[tuple[str, dict[str, object], str]] = [
        ("missing.py:Net", {}, r"^model.torch: file not found: missing.py$"),
        ("m.py:Other", {}, r"^model.torch: m.py has no class Other$"),
        ("broken.py:Net", {}, r"^model.torch: importing broken.py raised RuntimeError: nope$"),
        ("m.py:Net", {}, r"^model.input_shape: required to export a torch model"),
    ]
    for ref, extra, message in cases:
        with pytest.raises(SpecError, match=message):
            model_artifacts(torch_spec(ref, **extra), tmp_path)  # type: ignore[arg-type]


@pytest.mark.slow
def test_a_torch_model_is_exported(tmp_path: Path) -> None:
    (tmp_path / "tiny.py").write_text(
        textwrap.dedent(
            """
            from torch import nn

            class Tiny(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.fc = nn.Linear(4, 3)

                def forward(self, x):
                    return self.fc(x)
            """
        )
    )
    spec = torch_spec("tiny.py:Tiny")
    built = model_artifacts(spec, tmp_path, input_shape=[4])  # type: ignore[arg-type]
    assert set(built.artifacts) == {
        "train_step.onnx",
        "eval.onnx",
        "inference.onnx",
        "initial.tensors",
    }
    assert built.code == {}  # the onnxruntime backend sends no code
    weights = decode_tensors(built.artifacts["initial.tensors"])
    assert weights["fc.weight"].shape == (3, 4)


def test_bundles_are_deterministic_signed_and_role_specific(tmp_path: Path) -> None:
    key, _ = init_key(tmp_path)
    spec = {"name": "j", "backend": "onnxruntime", "algorithm": {"mode": "async"}}
    artifacts = {
        "train_step.onnx": b"t",
        "eval.onnx": b"e",
        "inference.onnx": b"i",
        "initial.tensors": b"w",
    }
    trainer = build_bundle(
        job="j-1", role="trainer", spec=spec, artifacts=artifacts, dataset="digits", created=1.0
    )
    again = build_bundle(
        job="j-1", role="trainer", spec=spec, artifacts=artifacts, dataset="digits", created=1.0
    )
    assert trainer.digest == again.digest
    assert set(trainer.artifacts) == {"train_step.onnx", "eval.onnx", "initial.tensors"}
    assert trainer.dataset == {"name": "digits"}
    aggregator = build_bundle(
        job="j-1", role="aggregator", spec=spec, artifacts=artifacts, created=1.0
    )
    assert "inference.onnx" in aggregator.artifacts
    assert aggregator.dataset == {}
    signed = sign(trainer, key)
    public = key.public_key()
    got = verify_bundle(signed.to_bytes(), {key_id(public): public}, allow_code=False)
    assert got == trainer
    with_code = build_bundle(
        job="j-1",
        role="trainer",
        spec={**spec, "backend": "torch"},
        artifacts=artifacts,
        code={"m.py": "class Net: ..."},
        created=1.0,
    )
    assert with_code.code == {"m.py": "class Net: ..."}


def test_aggregator_bundles_of_torch_jobs_carry_no_code() -> None:
    """The aggregator evaluates with the ONNX eval graph; its agent may refuse code bundles."""
    torch_spec = {"backend": "torch", "algorithm": {"mode": "async"}}
    blobs = {"train_step.onnx": b"t", "eval.onnx": b"e", "initial.tensors": b"i"}
    aggregator = build_bundle(
        job="j-2",
        role="aggregator",
        spec=torch_spec,
        artifacts=blobs,
        code={"m.py": "x"},
        created=1.0,
    )
    trainer = build_bundle(
        job="j-2", role="trainer", spec=torch_spec, artifacts=blobs, code={"m.py": "x"}, created=1.0
    )
    assert aggregator.code == {}
    assert trainer.code == {"m.py": "x"}
