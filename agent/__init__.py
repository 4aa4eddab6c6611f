"""Ember's edge agent: the daemon on every device, its role runtime and the wire protocol.

The wire protocol lives in :mod:`agent.protocol` because every role speaks it; the coordinator
imports it from here. Nothing in this package imports :mod:`coordinator`.
"""

__version__ = "0.1.0"
