"""Fixtures the hostile-input suite shares with the suites of the handlers it attacks."""

from tests.agent.test_runtime import rig  # noqa: F401 - a runtime and a coordinator client
