"""Fixtures for the edge images: the agent tests' watcher client on the test broker."""

from tests.agent.conftest import watcher

__all__ = ["watcher"]
