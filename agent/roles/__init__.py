"""Roles an agent can run: trainer, aggregator, middle aggregator (Flame's role abstraction).

Each role is a :class:`~agent.roles.base.Role` subclass registered by its bundle name; the role
runtime (:mod:`agent.runtime`) instantiates one per verified bundle.
"""

from agent.roles.base import ROLE_TYPES, LocalDataset, Role, RoleContext, register_role

__all__ = ["ROLE_TYPES", "LocalDataset", "Role", "RoleContext", "register_role"]
