"""The broker security kit: mosquitto configuration, accounts, ACL and a local CA."""

from coordinator.brokerkit.acl import COORDINATOR_USER, ENROL_USER, Account
from coordinator.brokerkit.kit import BrokerKit, KitError, KitSettings, Listener

__all__ = [
    "COORDINATOR_USER",
    "ENROL_USER",
    "Account",
    "BrokerKit",
    "KitError",
    "KitSettings",
    "Listener",
]
