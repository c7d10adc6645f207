"""Secrets never reach a log line: a filter for every handler the server logs through.

Applied to the access log and to every other record (Corral's own, uvicorn's, libraries'),
it rewrites the message, each string argument and the rendered traceback. It removes:

- the values of secret-bearing query parameters (`access_token`, and any parameter whose name
  holds token, key, secret, password, auth, credential, session or signature);
- credentials after an auth scheme (`Bearer ...`, `Basic ...`), and the values of
  Authorization, X-API-Key and Cookie headers however they are written (`name: value`,
  `(b'name', b'value')`, `name=value`);
- `password`/`secret`/`token` fields written as JSON or `key=value`;
- user info in URLs (`scheme://user:pass@`);
- Corral tokens (`crl_...`) wherever they appear, and the literal secrets the server knows (its
  admin key, the admin password), whatever their form.

The access log's arguments keep their positions (uvicorn's access formatter unpacks them).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

MASK = "[redacted]"

_SECRET_NAME = r"[\w.\-]*(?:token|key|secret|passw|pwd|auth|credential|session|signature)[\w.\-]*"

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # ?access_token=..., &api_key=...
    (re.compile(rf"(?i)([?&;]{_SECRET_NAME}=)[^&#\s\"']*"), rf"\g<1>{MASK}"),
    # Authorization, X-API-Key, Cookie values: `name: v`, `name=v`, `(b'name', b'v')`.
    (
        re.compile(
            r"(?i)((?:proxy-)?authorization|x-api-key|api-key|x-auth-token|(?:set-)?cookie)"
            r"(['\"]?\s*[:=,]\s*b?['\"]?)[^'\"\r\n]*"
        ),
        rf"\g<1>\g<2>{MASK}",
    ),
    # A credential after its scheme, when it looks like one (a digit or a symbol in it), so
    # that prose such as "basic checks" is left alone; header values are masked above anyway.
    (
        re.compile(
            r"(?i)\b(bearer|basic|digest)(\s+)"
            r"(?=[A-Za-z0-9._~+/=\-]*[0-9._~+/=\-])[A-Za-z0-9._~+/=\-]{6,}"
        ),
        rf"\1\2{MASK}",
    ),
    # JSON or key=value fields.
    (
        re.compile(
            r"(?i)([\"']?(?:password|passwd|secret|access_token|api_key|apikey|token)[\"']?"
            r"\s*[:=]\s*[\"']?)[^\"'&\s,}]+"
        ),
        rf"\g<1>{MASK}",
    ),
    # scheme://user:password@host, scheme://token@host
    (re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/\s@]+@"), rf"\g<1>{MASK}@"),
    # Corral tokens, wherever they are.
    (re.compile(r"\bcrl_[A-Za-z0-9_\-]{4,}"), f"crl_{MASK}"),
)

# Every pattern above needs one of these in the text: most text has none, and is let through
# after this one search instead of every substitution.
_TRIGGER = re.compile(
    r"(?i)token|key|secret|passw|pwd|auth|credential|session|signature|bearer|basic|digest|"
    r"cookie|://|crl_"
)


class Redactor:
    """Removes secrets from text: the patterns above and the literal secrets it was given."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        self._literals: list[str] = []
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str | None) -> None:
        # Short literals would mask ordinary words; the patterns cover the usual forms.
        if secret and len(secret) >= 6 and secret not in self._literals:
            self._literals.append(secret)
            self._literals.sort(key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for literal in self._literals:
            if literal in text:
                text = text.replace(literal, MASK)
        if _TRIGGER.search(text) is None:
            return text
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        return text


class RedactingFilter(logging.Filter):
    """A handler filter: every record it passes has its secrets removed."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redact = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = self.redact(record.msg)
        elif isinstance(record.msg, dict):  # a structlog event
            record.msg = {k: self._arg(v) for k, v in record.msg.items()}
        elif record.msg is not None and not isinstance(record.msg, int | float):
            record.msg = self.redact(str(record.msg))
        if isinstance(record.args, tuple):
            record.args = tuple(self._arg(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: self._arg(v) for k, v in record.args.items()}
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True

    def _arg(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, int | float | bool) or value is None:
            return value
        # Anything else is rendered with %s or %r: render it now, without its secrets.
        return _Rendered(self.redact(str(value)), self.redact(repr(value)))


class _Rendered:
    """An argument already turned into text, for both %s and %r."""

    __slots__ = ("_repr", "_str")

    def __init__(self, as_str: str, as_repr: str) -> None:
        self._str = as_str
        self._repr = as_repr

    def __str__(self) -> str:
        return self._str

    def __repr__(self) -> str:
        return self._repr


def _redacted_exception(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    """A record's traceback as the redacting filter left it, never rendered again from the
    exception itself (whose text may hold a secret)."""
    record = event.get("_record")
    event.pop("exc_info", None)
    if record is not None and record.exc_text:
        event["exception"] = record.exc_text
    return event


def _formatters(log_format: str) -> dict[str, Any]:
    """json: every record one JSON object a line (structlog's renderer), as the request lines
    api/observe.py writes. text: uvicorn's lines."""
    from structlog import processors, stdlib

    chain = [
        stdlib.add_log_level,
        stdlib.add_logger_name,
        processors.TimeStamper(fmt="iso", utc=True),
        _redacted_exception,
    ]
    if log_format == "json":
        rendered = {
            "()": stdlib.ProcessorFormatter,
            "processors": [stdlib.ProcessorFormatter.remove_processors_meta,
                           processors.JSONRenderer(ensure_ascii=False)],
            "foreign_pre_chain": chain,
        }  # fmt: skip
        return {"default": rendered}
    return {
        "default": {
            "()": "uvicorn.logging.DefaultFormatter",
            "fmt": "%(levelprefix)s %(message)s",
            "use_colors": None,
        },
    }


def log_config(level: str, redactor: Redactor, log_format: str = "json") -> dict[str, Any]:
    """uvicorn's logging configuration, with the redacting filter on every handler and
    Corral's own loggers (and, at warning, everything else) written through them. uvicorn's
    access log is off: api/observe.py writes one line per request instead (to standard output,
    at level info of logger `corral.request`)."""
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"redact": {"()": RedactingFilter, "redactor": redactor}},
        "formatters": _formatters(log_format),
        "handlers": {
            "default": {
                "formatter": "default",
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "filters": ["redact"],
            },
        },
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"handlers": [], "level": "CRITICAL", "propagate": False},
            "corral": {"handlers": ["default"], "level": level, "propagate": False},
        },
        "root": {"handlers": ["default"], "level": "WARNING"},
    }
