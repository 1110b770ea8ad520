"""One structured-logging set-up for every service: a JSON object per line on stderr, with the
trace_id and span_id (W3C hex, as trace backends show them) of the span current when the line
was logged, if any."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable

from opentelemetry import trace

__all__ = ["LogThrottle", "configure_logging"]

_STANDARD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class LogThrottle:
    """At most one line per `interval` seconds; the lines in between are counted, not written,
    and the next line written says how many were left out."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._interval = interval
        self._clock = clock
        self._next = float("-inf")
        self._skipped = 0

    def warning(self, message: str, *args: object) -> None:
        """Log `message % args` at WARNING unless a line was written less than `interval` ago."""
        now = self._clock()
        if now < self._next:
            self._skipped += 1
            return
        self._next = now + self._interval
        skipped, self._skipped = self._skipped, 0
        if skipped:
            self._log.warning(message + " (%d more warnings not logged)", *args, skipped)
        else:
            self._log.warning(message, *args)


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            entry["trace_id"] = format(span.trace_id, "032x")
            entry["span_id"] = format(span.span_id, "016x")
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(service: str, level: str = "INFO", *, json_lines: bool = True) -> None:
    """Replace the root handlers; called once from each service's main()."""
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {service} %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
