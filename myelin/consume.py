"""Durable JetStream pull consumption: fetch a batch, finish it, ack it, fetch again.

- Back-pressure by construction: at most one batch is held at a time.
- A failing batch is retried *in process*, in order, with backoff: later messages never
  overtake an unapplied one. If the process dies, the batch is redelivered.
- One ack per batch (``AckPolicy.ALL`` acks every earlier message too).
- A fetch that keeps failing (e.g. after a server restart) re-creates the subscription.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import NotFoundError

log = logging.getLogger(__name__)

BatchHandler = Callable[[list[Msg]], Awaitable[None]]


async def ensure_consumer(
    js: JetStreamContext,
    stream: str,
    durable: str,
    filter_subject: str,
    *,
    max_ack_pending: int,
    ack_wait_s: float,
    start_seq: int | None = None,
) -> None:
    """Create the durable consumer. With ``start_seq`` it is re-created to start there
    (the caller's own committed position is the source of truth)."""
    if start_seq is not None:
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer(stream, durable)
    else:
        try:
            await js.consumer_info(stream, durable)
            return
        except NotFoundError:
            pass
    cfg = api.ConsumerConfig(
        durable_name=durable,
        ack_policy=api.AckPolicy.ALL,
        ack_wait=ack_wait_s,
        max_ack_pending=max_ack_pending,
        filter_subject=filter_subject,
        deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE if start_seq else api.DeliverPolicy.ALL,
        opt_start_seq=start_seq if start_seq else None,
        max_deliver=-1,
    )
    await js.add_consumer(stream, cfg)


class PullLoop:
    """Runs ``handler`` over batches from a durable consumer until :meth:`stop`."""

    def __init__(
        self,
        js: JetStreamContext,
        stream: str,
        durable: str,
        handler: BatchHandler,
        *,
        batch: int,
        fetch_timeout_s: float = 0.5,
        max_backoff_s: float = 5.0,
        linger_s: float = 0.0,
    ) -> None:
        """``linger_s``: after a short fetch, keep collecting for up to this long before
        handling (for sinks that pay per call, like ClickHouse inserts)."""
        self._js = js
        self.stream = stream
        self.durable = durable
        self._handler = handler
        self._batch = batch
        self._fetch_timeout = fetch_timeout_s
        self._max_backoff = max_backoff_s
        self._linger = linger_s
        self._stopping = asyncio.Event()
        self.batches = 0
        self.messages = 0
        self.failures = 0
        self.idle = True
        self.position = 0  # stream sequence of the last message handled and acked
        self.pending = 0  # messages left in the consumer after that one (at fetch time)

    async def run(self) -> None:
        psub: JetStreamContext.PullSubscription | None = None
        fetch_errors = 0
        ahead: asyncio.Task[list[Msg]] | None = None  # the next batch, fetched while handling
        try:
            while not self._stopping.is_set():
                psub, fetch_errors, ahead = await self._step(psub, fetch_errors, ahead)
        finally:
            if ahead is not None:
                ahead.cancel()  # its messages are redelivered: nothing was acked
                with contextlib.suppress(BaseException):
                    await ahead
            if psub is not None:
                with contextlib.suppress(Exception):
                    await psub.unsubscribe()

    async def _step(
        self,
        psub: JetStreamContext.PullSubscription | None,
        fetch_errors: int,
        ahead: asyncio.Task[list[Msg]] | None,
    ) -> tuple[JetStreamContext.PullSubscription | None, int, asyncio.Task[list[Msg]] | None]:
        """One fetch-handle-ack round; returns the loop's state for the next one."""
        if psub is None:
            try:
                psub = await self._js.pull_subscribe_bind(durable=self.durable, stream=self.stream)
            except Exception as exc:  # noqa: BLE001 - server restarting: try again
                log.warning("%s: cannot bind consumer: %r", self.durable, exc)
                await self._sleep(1.0)
                return None, fetch_errors, None
        try:
            if ahead is not None:
                msgs, ahead = await ahead, None
            else:
                msgs = await psub.fetch(self._batch, timeout=self._fetch_timeout)
            fetch_errors = 0
        except (TimeoutError, nats.errors.TimeoutError):
            self.idle = True
            return psub, fetch_errors, None
        except Exception as exc:  # noqa: BLE001 - connection trouble
            fetch_errors += 1
            log.warning("%s: fetch failed (%d): %r", self.durable, fetch_errors, exc)
            if fetch_errors >= 3:  # a stalled pull subscription: re-create it
                with contextlib.suppress(Exception):
                    await psub.unsubscribe()
                psub = None
            await self._sleep(min(0.2 * fetch_errors, 2.0))
            return psub, fetch_errors, None
        if not msgs:
            return psub, fetch_errors, None
        if self._linger and len(msgs) < self._batch:
            msgs += await self._collect(psub, self._batch - len(msgs))
        self.idle = False
        if len(msgs) >= self._batch:  # behind: the next batch travels while this one is handled
            ahead = asyncio.create_task(psub.fetch(self._batch, timeout=self._fetch_timeout))
        if await self._handle(msgs):
            with contextlib.suppress(Exception):  # a lost ack only causes a harmless redelivery
                await msgs[-1].ack()
            self.batches += 1
            self.messages += len(msgs)
            meta = msgs[-1].metadata
            self.position, self.pending = meta.sequence.stream, meta.num_pending
        return psub, fetch_errors, ahead

    async def _collect(self, psub: JetStreamContext.PullSubscription, room: int) -> list[Msg]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._linger
        more: list[Msg] = []
        while len(more) < room and not self._stopping.is_set():
            left = deadline - loop.time()
            if left <= 0.001:
                break
            try:
                more += await psub.fetch(room - len(more), timeout=left)
            except (TimeoutError, nats.errors.TimeoutError):
                break
            except Exception as exc:  # noqa: BLE001 - handle what we have; the loop recovers
                log.warning("%s: fetch while lingering failed: %r", self.durable, exc)
                break
        return more

    async def _handle(self, msgs: list[Msg]) -> bool:
        delay = 0.1
        while True:
            try:
                await self._handler(msgs)
                return True
            except Exception:
                self.failures += 1
                log.exception(
                    "%s: batch of %d failed; retrying in %.1fs", self.durable, len(msgs), delay
                )
                with contextlib.suppress(Exception):
                    await msgs[-1].in_progress()
                if await self._sleep(delay):
                    return False
                delay = min(delay * 2, self._max_backoff)

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopping; True if stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return self._stopping.is_set()

    def stop(self) -> None:
        self._stopping.set()
