"""The one error root of the shared package.

Errors carry data. On the bus, the class decides what happens to the message:
``Retryable`` -> nak with delay, ``Poison`` -> terminate (dead-letter), anything else -> nak.
"""

from __future__ import annotations

import msgspec

#: What decoding untrusted bytes with msgspec can raise: its own errors, UnicodeDecodeError
#: for invalid UTF-8 inside a JSON string (not a MsgspecError), RecursionError for nesting.
BAD_INPUT: tuple[type[Exception], ...] = (msgspec.MsgspecError, UnicodeDecodeError, RecursionError)


class MyelinError(Exception):
    """Root of every error raised by Myelin code."""

    code: str = "myelin_error"

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message, **self.details}


class ConfigError(MyelinError):
    code = "config_error"


class Retryable(MyelinError):
    """A transient failure: try the same work again later."""

    code = "retryable"


class Poison(MyelinError):
    """Input that will never succeed: dead-letter it, do not retry."""

    code = "poison"


class Overloaded(Retryable):
    """Back-pressure: the caller should retry after ``retry_after`` seconds."""

    code = "overloaded"

    def __init__(self, message: str, retry_after: float = 1.0, **details: object) -> None:
        super().__init__(message, retry_after=retry_after, **details)
        self.retry_after = retry_after


class RemoteError(MyelinError):
    """A typed error reply received from another service over request-reply."""

    code = "remote_error"

    def __init__(self, code: str, message: str, **details: object) -> None:
        super().__init__(message, **details)
        self.code = code
