"""Bundles run only when signed by a trusted key, and code only where allowed."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.protocol.bundle import (
    BundleRejected,
    RoleBundle,
    SignedBundle,
    key_id,
    public_key_from_text,
    public_key_to_text,
    sign_bundle,
    verify_bundle,
)


def bundle(**overrides: object) -> RoleBundle:
    fields: dict[str, object] = {
        "job": "digits",
        "role": "trainer",
        "config": {"algorithm": {"mode": "async", "buffer_size": 10}, "client": {"lr": 0.05}},
        "dataset": {"name": "digits"},
        "artifacts": {"train_step.onnx": b"\x08\x01onnx bytes", "initial.tensors": b"\x90"},
    }
    fields.update(overrides)
    return RoleBundle(**fields)  # type: ignore[arg-type]


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def test_signed_bundle_round_trip(key: Ed25519PrivateKey) -> None:
    original = bundle()
    wire = sign_bundle(original, key).to_bytes()
    got = verify_bundle(wire, {key_id(key.public_key()): key.public_key()}, allow_code=False)
    assert got == original
    assert got.digest == original.digest == SignedBundle.from_bytes(wire).digest


def test_untrusted_key_is_refused(key: Ed25519PrivateKey) -> None:
    other = Ed25519PrivateKey.generate().public_key()
    wire = sign_bundle(bundle(), key).to_bytes()
    with pytest.raises(BundleRejected, match=f"signed by untrusted key {key_id(key.public_key())}"):
        verify_bundle(wire, {key_id(other): other}, allow_code=False)


def test_tampered_content_is_refused(key: Ed25519PrivateKey) -> None:
    signed = sign_bundle(bundle(), key)
    forged = SignedBundle(
        bundle(config={"client": {"lr": 99}}).to_bytes(), signed.key_id, signed.signature
    )
    trusted = {signed.key_id: key.public_key()}
    with pytest.raises(BundleRejected, match="signature does not verify"):
        verify_bundle(forged.to_bytes(), trusted, allow_code=False)
    wire = bytearray(signed.to_bytes())
    wire[-3] ^= 1  # inside the content: the digest no longer matches
    with pytest.raises(BundleRejected, match="digest does not match"):
        verify_bundle(bytes(wire), trusted, allow_code=False)


def test_code_runs_only_where_allowed(key: Ed25519PrivateKey) -> None:
    wire = sign_bundle(bundle(backend="torch", code={"model.py": "class Net: ..."}), key).to_bytes()
    trusted = {key_id(key.public_key()): key.public_key()}
    with pytest.raises(
        BundleRejected, match=r"carries Python code \(model\.py\) and this agent does not allow"
    ):
        verify_bundle(wire, trusted, allow_code=False)
    assert verify_bundle(wire, trusted, allow_code=True).code == {"model.py": "class Net: ..."}


@pytest.mark.parametrize(
    ("payload", "reason"), [(b"\x00", "not a signed_bundle map"), (b"\xc1", "0xc1")]
)
def test_garbage_is_refused_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(BundleRejected, match=reason):
        verify_bundle(payload, {}, allow_code=True)


def test_bad_fields_are_refused() -> None:
    with pytest.raises(ValueError, match=r"bundle\.role: must be one of"):
        bundle(role="miner")
    with pytest.raises(ValueError, match=r"bundle\.backend"):
        bundle(backend="tensorflow")
    with pytest.raises(ValueError, match=r"bundle\.job"):
        bundle(job="a/b")


def test_public_key_text_round_trip(key: Ed25519PrivateKey) -> None:
    text = public_key_to_text(key.public_key())
    assert text.startswith("ed25519:")
    assert key_id(public_key_from_text(text)) == key_id(key.public_key())
    with pytest.raises(ValueError, match="must start with"):
        public_key_from_text("ssh-ed25519 AAAA")
    with pytest.raises(ValueError, match="32 base64-encoded bytes"):
        public_key_from_text("ed25519:AAAA")
