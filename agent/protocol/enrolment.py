"""Enrolment by one-time token: the messages and the cryptography both sides share.

The operator makes a token with ``ember agents token``: ``<id>.<secret>``. The coordinator keeps
it (SQLite, with an expiry); the device gets it out of band (cloud-init, a shell). Then
``ember-agent enroll`` connects with the shared, low-value enrolment login, which may only
publish on ``<prefix>/enrol/requests`` and read ``<prefix>/enrol/replies/<its client id>``, and

1. sends an :class:`EnrolRequest` naming the token id, the agent id it wants, its MQTT client
   id and a fresh nonce, with ``proof`` = HMAC-SHA256 over those fields under a key derived
   from the token's secret (RFC 2104; keys by HKDF-SHA256, RFC 5869). The secret itself never
   travels, so a listener learns nothing it could use, and a replayed request is refused once
   the token is spent.
2. receives an :class:`EnrolReply`. An accepted one carries ``sealed``: the agent's broker
   login, the broker URL, the fleet's CA certificate and the coordinator's public keys,
   encrypted with AES-256-GCM under a second key derived from the secret, bound to the request
   id. Only a holder of the token can read it and nobody without the token can forge it, so
   the CA that arrives this way can be trusted even though the enrolment connection itself
   could not check the broker's certificate (the device had no CA yet): the scheme kubeadm's
   bootstrap tokens use to pin a cluster CA.

A refusal (unknown, wrong, spent or expired token; taken agent id) is a plain, unsealed reason.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent.protocol.errors import ProtocolError
from agent.protocol.messages import Length, Message, Name
from agent.protocol.msgpack_view import materialize, pack, unpack

TOKEN_ID_BYTES = 6
NONCE_BYTES = 16
GCM_NONCE_BYTES = 12


class TokenError(ValueError):
    """A token that is not ``<id>.<secret>``."""


@dataclass(frozen=True)
class Token:
    """A one-time enrolment token: a public id and a secret."""

    id: str
    secret: str

    @classmethod
    def new(cls) -> Token:
        return cls(secrets.token_hex(TOKEN_ID_BYTES), secrets.token_urlsafe(24))

    @classmethod
    def parse(cls, text: str) -> Token:
        token_id, sep, secret = text.strip().partition(".")
        if (
            not sep
            or len(token_id) != 2 * TOKEN_ID_BYTES
            or any(c not in "0123456789abcdef" for c in token_id)
            or len(secret) < 16
        ):
            raise TokenError("token: expected <id>.<secret> as printed by 'ember agents token'")
        return cls(token_id, secret)

    def __str__(self) -> str:
        return f"{self.id}.{self.secret}"

    def _key(self, purpose: bytes) -> bytes:
        return HKDF(
            algorithm=hashes.SHA256(),
            length=32,
            salt=self.id.encode(),
            info=b"ember enrolment v1 " + purpose,
        ).derive(self.secret.encode())

    def proof(self, request: EnrolRequest) -> bytes:
        """HMAC over what the request asks for, so none of it can be changed in transit."""
        fields = [request.id, request.token, request.agent, request.client, request.nonce]
        return hmac.new(self._key(b"proof"), pack(fields), hashlib.sha256).digest()

    def seal(self, request_id: str, grant: dict[str, Any]) -> bytes:
        nonce = os.urandom(GCM_NONCE_BYTES)
        box = AESGCM(self._key(b"seal"))
        return nonce + box.encrypt(nonce, pack(grant), request_id.encode())

    def open(self, request_id: str, sealed: bytes) -> dict[str, Any]:
        """The grant inside ``sealed``; :class:`ProtocolError` if it was not sealed with this
        token for this request."""
        box = AESGCM(self._key(b"seal"))
        try:
            plain = box.decrypt(
                sealed[:GCM_NONCE_BYTES], sealed[GCM_NONCE_BYTES:], request_id.encode()
            )
        except (InvalidTag, ValueError):
            raise ProtocolError("enrol_reply.sealed: not sealed with this token") from None
        grant = materialize(unpack(plain))
        if not isinstance(grant, dict):
            raise ProtocolError("enrol_reply.sealed: not a map")
        return grant


@dataclass(frozen=True, kw_only=True)
class EnrolRequest(Message):
    """An agent asks for its broker login with a token (see the module docstring)."""

    TYPE: ClassVar[str] = "enrol_request"
    token: Name
    """The token's public id."""
    agent: Name
    client: Name
    """The requester's MQTT client id: the reply goes to ``enrol/replies/<client>``."""
    nonce: Annotated[bytes, Length(NONCE_BYTES, 64)]
    proof: Annotated[bytes, Length(32, 32)] = b"\0" * 32
    version: Annotated[str, Length(0, 64)] = ""

    def signed(self, token: Token) -> EnrolRequest:
        from dataclasses import replace

        return replace(self, proof=token.proof(self))

    def proves(self, token: Token) -> bool:
        return hmac.compare_digest(self.proof, token.proof(self))


@dataclass(frozen=True, kw_only=True)
class EnrolReply(Message):
    """The coordinator's answer: ``sealed`` grant, or ``ok`` false and a ``reason``."""

    TYPE: ClassVar[str] = "enrol_reply"
    request: Name
    ok: bool
    reason: Annotated[str, Length(0, 1024)] = ""
    sealed: Annotated[bytes, Length(0, 64 * 1024)] = b""


def grant_fields(grant: dict[str, Any]) -> dict[str, Any]:
    """Check an opened grant's fields (a sealed grant is authentic, but may be from a newer
    coordinator): ``ProtocolError`` naming the field if one is missing or of the wrong type."""
    kinds: dict[str, Any] = {
        "agent": str,
        "username": str,
        "password": str,
        "urls": list,
        "prefix": str,
        "ca": str,
        "coordinator_keys": list,
    }
    for name, kind in kinds.items():
        if not isinstance(grant.get(name), kind):
            raise ProtocolError(f"enrol_reply.sealed.{name}: missing or not a {kind.__name__}")
    return grant
