"""What a failure means is decided by its class: transient (retried), poison (never),
or unknown (a few tries, then poison)."""

from __future__ import annotations

import nats.errors
import pytest
from nats.js.errors import APIError, BadRequestError, ServiceUnavailableError
from redis.exceptions import ConnectionError as RedisConnectionError

from myelin.consume import PoisonMessages, backoff, is_transient
from myelin.errors import Overloaded, Poison, Retryable
from services.features.online_store import ConcurrentWriter
from services.features.pipeline import ViewFailed


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (Retryable("the store restarts"), True),
        (Overloaded("full"), True),
        (ConcurrentWriter("moved"), True),
        (ConnectionRefusedError(), True),
        (TimeoutError(), True),
        (nats.errors.TimeoutError(), True),
        (nats.errors.NoRespondersError(), True),
        (RedisConnectionError("closed"), True),
        (ServiceUnavailableError(), True),
        (APIError(code=500), True),
        (
            BadRequestError(code=400, description="header size exceeds maximum allowed of 64k"),
            False,
        ),
        (Poison("bad request"), False),
        (PoisonMessages("undecodable", []), False),
        (ViewFailed("division by zero in the view"), False),
        (KeyError("bug"), None),
        (ZeroDivisionError(), None),
        (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), None),
    ],
)
def test_failures_are_classified(exc: BaseException, transient: bool | None) -> None:
    assert is_transient(exc) is transient


def test_backoff_is_jittered_exponential_and_capped() -> None:
    for attempt in range(12):
        d = min(5.0, 0.1 * 2**attempt)
        for _ in range(50):
            assert d / 2 <= backoff(attempt, 0.1, 5.0) <= d
