"""structlog set-up: console lines on a TTY, JSON lines otherwise; to stderr."""

from __future__ import annotations

import logging
import sys

import structlog


def setup(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer(colors=False)
        if sys.stderr.isatty()
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.EventRenamer("msg") if not sys.stderr.isatty() else _noop,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def _noop(_: object, __: str, event: structlog.typing.EventDict) -> structlog.typing.EventDict:
    return event
