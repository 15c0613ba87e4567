"""Log lines: plain text or one JSON object per line, each about a saga carrying its ids."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

# What a line about a saga carries (set with ``extra=`` by the engine).
CONTEXT_FIELDS = ("saga_id", "step", "trace_id")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the saga's ids."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message saga=… step=… trace=…``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ids = [
            f"{name.removesuffix('_id')}={getattr(record, name)}"
            for name in CONTEXT_FIELDS
            if getattr(record, name, None) is not None
        ]
        return f"{text} {' '.join(ids)}" if ids else text


def configure_logging(level: str, format: str) -> None:
    """Send the process's logs to stderr in ``format`` ("text" or "json")."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
