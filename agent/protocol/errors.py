"""Errors raised by the wire protocol: each carries a reason precise enough to log as is."""

from __future__ import annotations


class ProtocolError(ValueError):
    """An incoming payload was rejected; ``str(error)`` says exactly why.

    Raised for malformed msgpack or JSON, unknown message types, wrong field types, tensors whose
    dtype, shape or size is off, non-finite values and anything above a configured limit.
    """


class ChunkError(ProtocolError):
    """A chunk frame was rejected (corrupt, truncated, inconsistent with its siblings, too big)."""


class ReassemblyFull(ProtocolError):
    """A sound chunk of a message the reassembler has no room for now: refused, not corrupt.

    ``first`` is true for the message's first refused chunk (log it once), false for the later
    chunks of the same message. The sender's spool resends unacknowledged messages, so a refused
    message is delayed, not lost.
    """

    def __init__(self, reason: str, *, first: bool) -> None:
        super().__init__(reason)
        self.first = first


class PayloadTooLarge(ProtocolError):
    """A payload is larger than the configured maximum message size."""


def preview(value: object, width: int = 60) -> str:
    """``repr(value)`` cut to ``width`` characters, for error messages about untrusted input."""
    text = "nil" if value is None else repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."
