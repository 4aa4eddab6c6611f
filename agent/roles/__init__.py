"""Roles an agent can run: trainer, aggregator, middle aggregator, aggregator shard and
shard assembler (Flame's role abstraction).

Each role is a :class:`~agent.roles.base.Role` subclass registered by its bundle name; the role
runtime (:mod:`agent.runtime`) instantiates one per verified bundle. Importing this package
registers the built-in roles (it happens when the first role is assigned, not at start-up).
"""

from agent.roles.aggregator import Aggregator  # registers "aggregator"
from agent.roles.assembler import ShardAssembler  # registers "shard_assembler"
from agent.roles.base import ROLE_TYPES, LocalDataset, Role, RoleContext, register_role
from agent.roles.middle import MiddleAggregator  # registers "middle_aggregator"
from agent.roles.shard import AggregatorShard  # registers "aggregator_shard"
from agent.roles.trainer import Trainer  # registers "trainer"

__all__ = [
    "ROLE_TYPES",
    "Aggregator",
    "AggregatorShard",
    "LocalDataset",
    "MiddleAggregator",
    "Role",
    "RoleContext",
    "ShardAssembler",
    "Trainer",
    "register_role",
]
