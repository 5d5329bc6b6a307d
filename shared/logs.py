"""One logging setup for every service: plain text for people, JSON lines for machines.

Log lines carry context without every call site passing it: the request id of the RPC being
served (the server's ``CallInterceptor`` sets it from the caller's ``x-request-id`` metadata, or makes
one), and, where code sets them with ``log_context``, the event id or model version at hand.
Context variables follow the work into ``asyncio.to_thread`` workers.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from shared.settings import LogSettings

REQUEST_ID_METADATA = "x-request-id"
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
EVENT_ID: ContextVar[str | None] = ContextVar("event_id", default=None)
MODEL_VERSION: ContextVar[str | None] = ContextVar("model_version", default=None)
CONTEXT_FIELDS: dict[str, ContextVar[str | None]] = {
    "request_id": REQUEST_ID,
    "event_id": EVENT_ID,
    "model_version": MODEL_VERSION,
}
#: A caller's request id is kept if it is short and printable; anything else is replaced.
_ACCEPTABLE_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")


@contextmanager
def log_context(**fields: str | None) -> Iterator[None]:
    """Adds ``event_id`` / ``model_version`` / ``request_id`` to every log line written inside."""
    tokens = []
    for name, value in fields.items():
        tokens.append((CONTEXT_FIELDS[name], CONTEXT_FIELDS[name].set(value)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class ContextFilter(logging.Filter):
    """Copies the context variables that are set onto each record (``extra=`` values win)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in CONTEXT_FIELDS.items():
            value = var.get()
            if value is not None and not hasattr(record, name):
                setattr(record, name, value)
        return True


class PlainFormatter(logging.Formatter):
    """Text for people: the usual line, then any context as ``key=value``."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = " ".join(f"{k}={getattr(record, k)}" for k in CONTEXT_FIELDS if getattr(record, k, None))
        return f"{line} [{context}]" if context else line


# Attributes every LogRecord has; anything else was passed through ``extra=`` and is kept.
_STANDARD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object per line, keeping fields passed via ``extra=``."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                doc[key] = value if isinstance(value, str | int | float | bool | None) else str(value)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def configure_logging(settings: LogSettings, service: str) -> None:
    """Configures the root logger once, at a service's entry point."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    if settings.json_lines:
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(PlainFormatter(f"%(asctime)s %(levelname)-7s {service} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level)
    # Libraries that are chatty at INFO.
    for noisy in ("alembic.runtime.migration", "nats"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def request_id_from(metadata: Any) -> str:
    """The caller's ``x-request-id`` when acceptable, else a new id."""
    for key, value in metadata or ():
        if key == REQUEST_ID_METADATA:
            text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            if _ACCEPTABLE_ID.fullmatch(text):
                return text
    return uuid.uuid4().hex
