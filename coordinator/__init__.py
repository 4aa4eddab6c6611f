"""Ember's control plane: fleet registry, job specs, placement, signed bundles, state, CLI.

It speaks the wire protocol of :mod:`agent.protocol` and never trains or aggregates itself.
"""

from agent import __version__

__all__ = ["__version__"]
