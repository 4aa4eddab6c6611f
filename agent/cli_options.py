"""Click options that ``ember-agent`` (:mod:`agent.cli`) and ``ember`` (:mod:`coordinator.cli`)
both take."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

LOG_LEVELS = ("debug", "info", "warning", "error")


def log_level_option(default: str) -> Callable[[F], F]:
    """``--log-level``, one of :data:`LOG_LEVELS` in any case, defaulting to ``default``."""
    return click.option(
        "--log-level",
        default=default,
        show_default=True,
        type=click.Choice(list(LOG_LEVELS), case_sensitive=False),
    )
