"""Size limits that bound what a peer can make us allocate."""

from __future__ import annotations

from dataclasses import dataclass

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True, kw_only=True)
class ProtocolLimits:
    """Upper bounds checked on every incoming message before anything is allocated for it.

    The defaults fit a model of about 100 M float32 parameters; a deployment lowers them for
    small devices (an agent on a 1 GB Raspberry Pi has no use for a 512 MiB message).
    """

    max_message_bytes: int = 512 * MiB
    """Largest whole message, after reassembly of its chunks."""
    max_tensors: int = 4096
    """Most tensors in one message."""
    max_tensor_elements: int = 1 << 28
    """Most elements in one tensor."""
    max_ndim: int = 8
    """Most dimensions of one tensor."""
    max_name_length: int = 256
    """Longest tensor name, message type or identifier, in characters."""
    max_string_length: int = 64 * KiB
    """Longest string field."""
    max_collection_length: int = 100_000
    """Most items in one list or map (other than tensor data)."""
    max_depth: int = 16
    """Deepest nesting of lists and maps."""


DEFAULT_LIMITS = ProtocolLimits()
