"""Enrolment tokens: the request's proof and the reply's seal."""

from __future__ import annotations

import dataclasses

import pytest

from agent.protocol.enrolment import EnrolReply, EnrolRequest, Token, TokenError
from agent.protocol.errors import ProtocolError
from agent.protocol.messages import decode_message


def request(token: Token, **fields: object) -> EnrolRequest:
    values = {"token": token.id, "agent": "pi-a", "client": "enrol-1", "nonce": b"n" * 16}
    return EnrolRequest(**{**values, **fields}).signed(token)  # type: ignore[arg-type]


def test_tokens_print_and_parse() -> None:
    token = Token.new()
    assert Token.parse(f"  {token}\n") == token
    for bad in ("", "nodot", "xyz.secretsecretsecret", f"{token.id}.short"):
        with pytest.raises(TokenError, match=r"expected <id>\.<secret>"):
            Token.parse(bad)


def test_the_proof_binds_every_field_to_the_secret() -> None:
    token = Token.new()
    signed = decode_message(request(token).to_msgpack(), expect=EnrolRequest)
    assert signed.proves(token)
    assert not signed.proves(Token(token.id, "another secret entirely"))
    for change in ({"agent": "pi-b"}, {"client": "enrol-2"}, {"nonce": b"m" * 16}):
        assert not dataclasses.replace(signed, **change).proves(token)  # type: ignore[arg-type]


def test_only_the_token_opens_the_grant_and_only_for_its_request() -> None:
    token = Token.new()
    sealed = token.seal("req-1", {"agent": "pi-a", "password": "pw"})
    reply = decode_message(
        EnrolReply(request="req-1", ok=True, sealed=sealed).to_msgpack(), expect=EnrolReply
    )
    assert token.open("req-1", reply.sealed) == {"agent": "pi-a", "password": "pw"}
    with pytest.raises(ProtocolError, match="not sealed with this token"):
        token.open("req-2", sealed)
    with pytest.raises(ProtocolError, match="not sealed with this token"):
        Token.new().open("req-1", sealed)
    tampered = bytearray(sealed)
    tampered[-1] ^= 1
    with pytest.raises(ProtocolError, match="not sealed with this token"):
        token.open("req-1", bytes(tampered))
