"""Role bundles: everything an agent needs to run one role, content-addressed and signed.

A :class:`RoleBundle` names the job and the role, the training backend, the job's configuration
(algorithm, hyper-parameters, stop rules), the dataset binding for trainers and the model
artifacts (ONNX graphs, initial weights as tensors). Its msgpack bytes are its content; the
SHA-256 of the content is its address. The coordinator signs the content with Ed25519
(RFC 8032) and sends a :class:`SignedBundle` inside an ``assign_role`` command. An agent runs a
bundle only when :func:`verify_bundle` accepts it: signed by a key it trusts and, when it carries
Python source, only where the agent's configuration allows code.

ONNX graphs and tensors are data. Python source (a torch model class) is code.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.protocol.errors import ProtocolError, preview
from agent.protocol.limits import DEFAULT_LIMITS, ProtocolLimits
from agent.protocol.msgpack_view import Buffer, materialize, pack, unpack
from agent.protocol.topics import DEFAULT_PREFIX, check_segment

BUNDLE_VERSION = 1
ROLES = frozenset(
    {"trainer", "aggregator", "middle_aggregator", "aggregator_shard", "shard_assembler"}
)
BACKENDS = frozenset({"onnxruntime", "torch"})
KEY_PREFIX = "ed25519:"


class BundleRejected(ProtocolError):
    """A bundle the agent will not run; ``str(error)`` is the reason reported to the coordinator."""


@dataclass(frozen=True, kw_only=True)
class RoleBundle:
    """One role of one job, as the agent receives it (Flame's role + channel abstraction)."""

    job: str
    role: str
    backend: str = "onnxruntime"
    prefix: str = DEFAULT_PREFIX
    """Topic prefix the role speaks under."""
    config: dict[str, Any] = field(default_factory=dict)
    """The job's algorithm, client hyper-parameters and stop rules (from the job spec)."""
    dataset: dict[str, Any] = field(default_factory=dict)
    """Dataset binding for data-consuming roles: at least ``{"name": ...}``."""
    artifacts: dict[str, bytes] = field(default_factory=dict)
    """Model files by name: ONNX graphs, initial weights (tensor codec), ..."""
    code: dict[str, str] = field(default_factory=dict)
    """Python sources by module file name; run only where the agent allows code bundles."""
    created: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        check_segment(self.job, "bundle.job")
        if self.role not in ROLES:
            raise ValueError(f"bundle.role: must be one of {sorted(ROLES)}, got {self.role!r}")
        if self.backend not in BACKENDS:
            raise ValueError(
                f"bundle.backend: must be one of {sorted(BACKENDS)}, got {self.backend!r}"
            )

    def to_bytes(self) -> bytes:
        """The bundle's content: deterministic msgpack (fields in a fixed order)."""
        return pack(
            {
                "v": BUNDLE_VERSION,
                "job": self.job,
                "role": self.role,
                "backend": self.backend,
                "prefix": self.prefix,
                "config": self.config,
                "dataset": self.dataset,
                "artifacts": self.artifacts,
                "code": self.code,
                "created": self.created,
            }
        )

    @classmethod
    def from_bytes(cls, content: Buffer, limits: ProtocolLimits = DEFAULT_LIMITS) -> RoleBundle:
        """Parse bundle content, refusing anything malformed with a :class:`BundleRejected`."""
        try:
            raw = unpack(content, limits)
        except ProtocolError as exc:
            raise BundleRejected(f"bundle content: {exc}") from None
        if not isinstance(raw, dict):
            raise BundleRejected("bundle content: not a map")
        if raw.get("v") != BUNDLE_VERSION:
            raise BundleRejected(f"bundle.v: unsupported bundle version {preview(raw.get('v'))}")
        try:
            return cls(
                job=_typed(raw, "job", str),
                role=_typed(raw, "role", str),
                backend=_typed(raw, "backend", str),
                prefix=_typed(raw, "prefix", str),
                config=materialize(_typed(raw, "config", dict)),
                dataset=materialize(_typed(raw, "dataset", dict)),
                artifacts={
                    name: _blob(value, f"bundle.artifacts.{name}")
                    for name, value in _typed(raw, "artifacts", dict).items()
                },
                code={
                    name: _text(value, f"bundle.code.{name}")
                    for name, value in _typed(raw, "code", dict).items()
                },
                created=float(_typed(raw, "created", (int, float))),
            )
        except ValueError as exc:
            raise BundleRejected(str(exc)) from None

    @property
    def digest(self) -> str:
        """The bundle's content address (SHA-256, hex)."""
        return hashlib.sha256(self.to_bytes()).hexdigest()


@dataclass(frozen=True)
class SignedBundle:
    """Bundle content with its Ed25519 signature and the id of the signing key."""

    content: bytes
    key_id: str
    signature: bytes

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    def to_bytes(self) -> bytes:
        return pack(
            {
                "v": BUNDLE_VERSION,
                "type": "signed_bundle",
                "key_id": self.key_id,
                "digest": self.digest,
                "signature": self.signature,
                "content": self.content,
            }
        )

    @classmethod
    def from_bytes(cls, data: Buffer, limits: ProtocolLimits = DEFAULT_LIMITS) -> SignedBundle:
        try:
            raw = unpack(data, limits)
        except ProtocolError as exc:
            raise BundleRejected(f"signed bundle: {exc}") from None
        if not isinstance(raw, dict) or raw.get("type") != "signed_bundle":
            raise BundleRejected("signed bundle: not a signed_bundle map")
        if raw.get("v") != BUNDLE_VERSION:
            raise BundleRejected(f"signed bundle: unsupported version {preview(raw.get('v'))}")
        signed = cls(
            content=_blob(raw.get("content"), "signed bundle.content"),
            key_id=_text(raw.get("key_id"), "signed bundle.key_id"),
            signature=_blob(raw.get("signature"), "signed bundle.signature"),
        )
        if raw.get("digest") != signed.digest:
            raise BundleRejected("signed bundle: digest does not match the content")
        return signed


# -- keys ----------------------------------------------------------------------------------------


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short, stable id for a public key: the first 16 hex digits of SHA-256 of its raw bytes."""
    return hashlib.sha256(_raw(public_key)).hexdigest()[:16]


def public_key_to_text(public_key: Ed25519PublicKey) -> str:
    """``ed25519:<base64 of the 32 raw bytes>``, the form agents keep in their config."""
    return KEY_PREFIX + base64.b64encode(_raw(public_key)).decode()


def public_key_from_text(text: str) -> Ed25519PublicKey:
    """Inverse of :func:`public_key_to_text`; ``ValueError`` with the reason otherwise."""
    body = text.strip()
    if not body.startswith(KEY_PREFIX):
        raise ValueError(f"public key must start with {KEY_PREFIX!r}")
    try:
        raw = base64.b64decode(body[len(KEY_PREFIX) :], validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise ValueError(f"public key is not 32 base64-encoded bytes: {exc}") from None


def _raw(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)


# -- signing and verification --------------------------------------------------------------------


def sign_bundle(bundle: RoleBundle, private_key: Ed25519PrivateKey) -> SignedBundle:
    """Sign a bundle's content (done by the coordinator, which holds the private key)."""
    content = bundle.to_bytes()
    return SignedBundle(content, key_id(private_key.public_key()), private_key.sign(content))


def verify_bundle(
    data: Buffer,
    trusted: Mapping[str, Ed25519PublicKey],
    *,
    allow_code: bool,
    limits: ProtocolLimits = DEFAULT_LIMITS,
) -> RoleBundle:
    """The bundle inside ``data`` if it may run here, else :class:`BundleRejected` with the reason.

    ``trusted`` maps key ids to the coordinator keys this agent trusts.
    """
    signed = SignedBundle.from_bytes(data, limits)
    key = trusted.get(signed.key_id)
    if key is None:
        raise BundleRejected(
            f"bundle {signed.digest[:12]} is signed by untrusted key {signed.key_id}"
        )
    try:
        key.verify(signed.signature, signed.content)
    except InvalidSignature:
        raise BundleRejected(f"bundle {signed.digest[:12]}: signature does not verify") from None
    bundle = RoleBundle.from_bytes(signed.content, limits)
    if bundle.code and not allow_code:
        raise BundleRejected(
            f"bundle {signed.digest[:12]} carries Python code ({', '.join(sorted(bundle.code))}) "
            "and this agent does not allow code bundles"
        )
    return bundle


# -- field helpers -------------------------------------------------------------------------------


def _typed(raw: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = raw.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"bundle.{name}: expected {_kind_name(kind)}, got {preview(value)}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _blob(value: Any, where: str) -> bytes:
    if not isinstance(value, (memoryview, bytes)):
        raise BundleRejected(f"{where}: expected binary data, got {preview(value)}")
    return bytes(value)


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise BundleRejected(f"{where}: expected a string, got {preview(value)}")
    return value
