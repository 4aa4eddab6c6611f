"""Ember's wire protocol, spoken by agents and the coordinator alike.

* :mod:`~agent.protocol.topics`: topic names under a configurable prefix;
* :mod:`~agent.protocol.messages`: typed messages and the one place that validates them;
* :mod:`~agent.protocol.codec`: tensors as msgpack maps of raw little-endian bytes;
* :mod:`~agent.protocol.chunking`: chunk frames and their bounded reassembly.

Nothing here is ever pickled.
"""

from agent.protocol.chunking import DEFAULT_CHUNK_SIZE, Reassembler, is_chunk, split
from agent.protocol.codec import TensorMap, decode_tensors, encode_tensors
from agent.protocol.errors import ChunkError, PayloadTooLarge, ProtocolError
from agent.protocol.limits import DEFAULT_LIMITS, ProtocolLimits
from agent.protocol.messages import (
    PROTOCOL_VERSION,
    AgentStatus,
    AssignRole,
    CancelRole,
    Message,
    ModelRequest,
    ModelUpdate,
    ModelVersion,
    Ping,
    Pong,
    RingChunk,
    RpcRequest,
    RpcResponse,
    ShardCommit,
    ShardHeld,
    UpdateAck,
    decode_message,
    new_message_id,
)
from agent.protocol.topics import DEFAULT_PREFIX, Topics, check_segment

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_LIMITS",
    "DEFAULT_PREFIX",
    "PROTOCOL_VERSION",
    "AgentStatus",
    "AssignRole",
    "CancelRole",
    "ChunkError",
    "Message",
    "ModelRequest",
    "ModelUpdate",
    "ModelVersion",
    "PayloadTooLarge",
    "Ping",
    "Pong",
    "ProtocolError",
    "ProtocolLimits",
    "Reassembler",
    "RingChunk",
    "RpcRequest",
    "RpcResponse",
    "ShardCommit",
    "ShardHeld",
    "TensorMap",
    "Topics",
    "UpdateAck",
    "check_segment",
    "decode_message",
    "decode_tensors",
    "encode_tensors",
    "is_chunk",
    "new_message_id",
    "split",
]
