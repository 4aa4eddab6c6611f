"""structlog set-up shared by every Ember process.

JSON lines when the output is not a terminal or when running under systemd (``JOURNAL_STREAM``
is set), coloured key=value lines on a terminal. Standard-library loggers (paho-mqtt, zeroconf,
onnxruntime) are routed through the same renderer.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Literal

import structlog

LogFormat = Literal["auto", "json", "console"]


def configure_logging(level: str | int = "info", fmt: LogFormat = "auto") -> None:
    """Configure structlog and the standard library's root logger once per process."""
    if isinstance(level, str):
        level = (
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
            if hasattr(logging, "getLevelNamesMapping")
            else getattr(logging, level.upper(), logging.INFO)
        )
    if fmt == "auto":
        fmt = "json" if os.environ.get("JOURNAL_STREAM") or not sys.stderr.isatty() else "console"
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # paho logs every packet at DEBUG; keep it quiet unless asked for.
    logging.getLogger("ember.paho").setLevel(max(level, logging.WARNING))
