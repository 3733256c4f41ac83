"""Durable JetStream pull consumption: fetch a batch, finish it, ack it, fetch again.

- Back-pressure by construction: at most one batch is held at a time.
- One ack per batch (``AckPolicy.ALL`` acks every earlier message too) when one process
  owns the consumer; a consumer shared by several processes (``shared=True``: ingest's
  workers on the inbox) acks each message (``AckPolicy.EXPLICIT``), or one worker's ack
  would acknowledge messages another worker has not finished (the fault harness lost a
  batch that way: its worker was killed mid-batch and the other's ack covered it).
- A fetch that keeps failing (e.g. after a server restart) re-creates the subscription.
- In order, without gaps (one owner; the default unless ``shared``): a fetch whose
  messages were lost on the way (a JetStream cluster failing over, a connection dropped
  mid-fetch, a pull request left behind by an earlier subscription) leaves them pending
  in the consumer while later ones arrive, and acking a later one (``AckPolicy.ALL``)
  would acknowledge them unread. The server numbers every delivery (the consumer
  sequence, new for each redelivery too), so a delivery that never arrived shows as a
  jump in that number, whatever the consumer's filter. The loop then handles only what
  came before the jump, and restarts the consumer right after the last message it
  handled: everything after it is delivered again, in order, at once (not after the ack
  wait). A message at or below that position (a redelivery of one already handled) is
  skipped. A consumer found with deliveries outstanding when the loop binds (a process
  killed mid-batch) is restarted the same way.

What a failure means is decided by its class (:func:`is_transient`), never by retrying
until it works:

- **transient** (``Retryable``, connection trouble, timeouts): the batch is retried *in
  process*, in order, with jittered exponential backoff, for as long as it takes; later
  messages never overtake an unapplied one. After ``alert_after`` tries in a row the loop
  reports itself ``retrying`` (status, metrics, readiness) and logs at error level.
- **poison** (``Poison``, or any other error that failed ``unknown_attempts`` times): the
  message can never be processed. With ``on_poison="isolate"`` the batch is re-run one
  message at a time, in order; each message that fails for good is dead-lettered (reason,
  stream, sequence, sanitized payload) and terminated (``AckTerm``), and the rest flows.
  With ``on_poison="stop"`` (a consumer whose *code* is what failed, like a feature view)
  the loop stops with its error, acking nothing; other consumers are unaffected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Literal

import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.errors import APIError, BadRequestError, NotFoundError, ServiceUnavailableError
from redis.exceptions import BusyLoadingError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from myelin import telemetry
from myelin.errors import Poison, Retryable

log = logging.getLogger(__name__)

BatchHandler = Callable[[list[Msg]], Awaitable[None]]
# (message, reason code, what went wrong) -> stored in the DLQ; raises if it could not be
DeadLetterSink = Callable[[Msg, str, str], Awaitable[None]]
OnPoison = Literal["isolate", "stop"]

_TRANSIENT: tuple[type[BaseException], ...] = (
    Retryable,
    ConnectionError,
    TimeoutError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.FlushTimeoutError,
    nats.errors.NoServersError,
    ServiceUnavailableError,
    RedisConnectionError,
    RedisTimeoutError,
    BusyLoadingError,
)


class PoisonMessages(Poison):
    """Raised by a batch handler that knows which of its messages can never be processed:
    those are dead-lettered and terminated, and the handler runs again on the rest."""

    code = "undecodable"

    def __init__(self, message: str, msgs: list[Msg], code: str = "") -> None:
        super().__init__(message, messages=len(msgs))
        self.msgs = msgs
        if code:
            self.code = code


def is_transient(exc: BaseException) -> bool | None:
    """True: try again later. False: it will never work (poison). None: unknown — retried a
    few times, then treated as poison.

    A JetStream refusal with status 400 (e.g. ``header size exceeds maximum allowed of
    64k``) is permanent: the same request is refused every time."""
    if isinstance(exc, Poison):
        return False
    if isinstance(exc, BadRequestError):
        return False
    if isinstance(exc, _TRANSIENT):
        return True
    if isinstance(exc, APIError) and (exc.code or 0) >= 500:
        return True
    if isinstance(exc, OSError):
        return True
    return None


def backoff(attempt: int, base: float = 0.1, cap: float = 5.0) -> float:
    """Full-jitter exponential backoff: uniform in [d/2, d], d = base * 2**attempt, capped."""
    d = min(cap, base * (1 << min(attempt, 30)))
    return d * random.uniform(0.5, 1.0)


async def ensure_consumer(
    js: JetStreamContext,
    stream: str,
    durable: str,
    filter_subject: str,
    *,
    max_ack_pending: int,
    ack_wait_s: float,
    start_seq: int | None = None,
    shared: bool = False,
) -> None:
    """Create the durable consumer. With ``start_seq`` it is re-created to start there
    (the caller's own committed position is the source of truth). ``shared``: several
    processes pull from it (explicit acks). An existing consumer with another ack policy
    is re-created to resume right after its ack floor."""
    policy = api.AckPolicy.EXPLICIT if shared else api.AckPolicy.ALL
    if start_seq is not None:
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer(stream, durable)
    else:
        try:
            info = await js.consumer_info(stream, durable)
            if info.config.ack_policy == policy:
                return
            start_seq = (info.ack_floor.stream_seq if info.ack_floor else 0) + 1
            await js.delete_consumer(stream, durable)
        except NotFoundError:
            pass
    cfg = api.ConsumerConfig(
        durable_name=durable,
        ack_policy=policy,
        ack_wait=ack_wait_s,
        max_ack_pending=max_ack_pending,
        filter_subject=filter_subject,
        deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE if start_seq else api.DeliverPolicy.ALL,
        opt_start_seq=start_seq if start_seq else None,
        # Unlimited on purpose: a message is never given up on by the server; the loop
        # decides (transient -> retry, poison -> dead-letter and terminate).
        max_deliver=-1,
    )
    await js.add_consumer(stream, cfg)


RUNNING: weakref.WeakSet[PullLoop] = weakref.WeakSet()
"""The pull loops running in this process (their lag is exported: :mod:`myelin.slis`)."""


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
        dead_letter: DeadLetterSink | None = None,
        on_poison: OnPoison = "isolate",
        on_stopped: Callable[[BaseException], Awaitable[None]] | None = None,
        alert_after: int = 5,
        unknown_attempts: int = 3,
        shared: bool = False,
        in_order: bool | None = None,
    ) -> None:
        """``linger_s``: after a short fetch, keep collecting for up to this long before
        handling (for sinks that pay per call, like ClickHouse inserts).
        ``dead_letter``: where ``on_poison="isolate"`` stores a message it gives up on
        (without one, such a message is logged and terminated).
        ``on_stopped``: called once when ``on_poison="stop"`` stops the loop.
        ``shared``: the consumer is pulled by several processes (see :func:`ensure_consumer`):
        every message is acked on its own.
        ``in_order``: never handle what follows a lost delivery (see the module's notes);
        on by default unless ``shared``."""
        self._js = js
        self.stream = stream
        self.durable = durable
        self._handler = handler
        self._batch = batch
        self._fetch_timeout = fetch_timeout_s
        self._max_backoff = max_backoff_s
        self._linger = linger_s
        self._dead_letter = dead_letter
        self._on_poison = on_poison
        self._on_stopped = on_stopped
        self._alert_after = alert_after
        self._unknown_attempts = unknown_attempts
        self._shared = shared
        self._in_order_on = (not shared) if in_order is None else in_order
        self._dseq = 0  # consumer sequence of the last delivery received
        self._rewind = False  # a delivery was lost: restart after ``position`` on rebind
        self._stopping = asyncio.Event()
        self.batches = 0
        self.messages = 0
        self.failures = 0  # failed attempts, all kinds
        self.attempts = 0  # failed attempts in a row on the current batch
        self.dead_lettered = 0
        self.dead_letter_failures = 0  # given up on without a dead letter (see _give_up_on)
        self.last_error = ""
        self.stopped_error = ""  # set when on_poison="stop" stopped the loop
        self.idle = True
        self.position = 0  # stream sequence of the last message handled and acked
        self.gaps = 0  # times deliveries were lost and the consumer restarted after them
        self.rewinds = 0  # consumer restarts done (after a lost delivery or at bind)
        self.pending = 0  # messages left in the consumer after that one (at fetch time)
        self._last_ts = 0.0  # stream timestamp (unix s) of the last message handled

    @property
    def state(self) -> str:
        """``ok``; ``retrying`` (a transient failure, ``alert_after`` tries or more in a
        row); ``stopped`` (a poison failure under ``on_poison="stop"``)."""
        if self.stopped_error:
            return "stopped"
        if self.attempts >= self._alert_after:
            return "retrying"
        return "ok"

    @property
    def healthy(self) -> bool:
        return self.state == "ok"

    @property
    def lag_seconds(self) -> float:
        """How far behind the stream this consumer is: the age of the last message it
        handled while more wait behind it (an upper bound on the age of the oldest one
        waiting); 0 when it has caught up."""
        if not self.pending or not self._last_ts:
            return 0.0
        return max(time.time() - self._last_ts, 0.0)

    def snapshot(self) -> dict[str, object]:
        return {
            "state": self.state,
            "position": self.position,
            "pending": self.pending,
            "lag_s": round(self.lag_seconds, 3),
            "messages": self.messages,
            "failures": self.failures,
            "attempts": self.attempts,
            "dead_lettered": self.dead_lettered,
            "dead_letter_failures": self.dead_letter_failures,
            "gaps": self.gaps,
            "rewinds": self.rewinds,
            "error": self.stopped_error or (self.last_error if self.attempts else ""),
        }

    async def run(self) -> None:
        psub: JetStreamContext.PullSubscription | None = None
        fetch_errors = 0
        ahead: asyncio.Task[list[Msg]] | None = None  # the next batch, fetched while handling
        RUNNING.add(self)
        try:
            while not self._stopping.is_set() and not self.stopped_error:
                psub, fetch_errors, ahead = await self._step(psub, fetch_errors, ahead)
        finally:
            RUNNING.discard(self)
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
                if self._in_order_on:
                    await self._sync()
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
            self.pending = 0  # nothing came for a whole fetch: nothing waits for this loop
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
        if self._in_order_on:
            msgs = self._in_order(msgs)
        if msgs:
            self.idle = False
            # Behind: the next batch travels while this one is handled. Not for a shared
            # consumer: messages fetched ahead wait on this worker when another could take
            # them; not after a lost delivery: the consumer restarts next.
            if len(msgs) >= self._batch and not self._shared and not self._rewind:
                ahead = asyncio.create_task(psub.fetch(self._batch, timeout=self._fetch_timeout))
            if await self._handle(msgs):
                await self._acked(msgs)
        if self._rewind:  # rebind: the consumer restarts after what was handled
            with contextlib.suppress(Exception):
                await psub.unsubscribe()
            return None, 0, None
        return psub, fetch_errors, ahead

    def _in_order(self, msgs: list[Msg]) -> list[Msg]:
        """The messages received without a lost delivery before them and not handled
        already (see the module's notes); a lost delivery marks the consumer for a
        restart after the last message handled."""
        out: list[Msg] = []
        for i, m in enumerate(msgs):
            seq = m.metadata.sequence
            if seq.consumer != self._dseq + 1:
                self.gaps += 1
                self._rewind = True
                log.warning(
                    "%s: deliveries %d..%d never arrived; handling the %d before them, then "
                    "restarting the consumer after stream sequence %d (%d later message(s) "
                    "come again)",
                    self.durable,
                    self._dseq + 1,
                    seq.consumer - 1,
                    len(out),
                    max([self.position, *(o.metadata.sequence.stream for o in out)]),
                    len(msgs) - i,
                )
                break
            self._dseq = seq.consumer
            if seq.stream <= self.position:
                continue  # handled already (its ack was lost or late): the next ack covers it
            out.append(m)
        return out

    async def _sync(self) -> None:
        """Before binding: where the consumer's acks stand (nothing before is due), and a
        restart right after the last message handled when deliveries are outstanding (lost
        on the way, or held by a process that died) so they come again now and in order."""
        info = await self._js.consumer_info(self.stream, self.durable)
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        self.position = max(self.position, floor or 0)
        if self._rewind or (info.num_ack_pending or 0) > 0:
            cfg = info.config
            cfg.deliver_policy = api.DeliverPolicy.BY_START_SEQUENCE
            cfg.opt_start_seq = self.position + 1
            cfg.opt_start_time = None
            with contextlib.suppress(NotFoundError):
                await self._js.delete_consumer(self.stream, self.durable)
            await self._js.add_consumer(self.stream, cfg)
            self.rewinds += 1
            self._rewind = False
            self._dseq = 0
            log.info(
                "%s: consumer restarted at stream sequence %d", self.durable, cfg.opt_start_seq
            )
        else:
            self._dseq = info.delivered.consumer_seq or 0 if info.delivered else 0

    async def _acked(self, msgs: list[Msg]) -> None:
        with contextlib.suppress(Exception):  # a lost ack only causes a harmless redelivery
            for m in msgs if self._shared else msgs[-1:]:
                await m.ack()
        self.batches += 1
        self.messages += len(msgs)
        meta = msgs[-1].metadata
        self.position, self.pending = meta.sequence.stream, meta.num_pending
        if meta.timestamp is not None:
            self._last_ts = meta.timestamp.timestamp()

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
        """True when ``msgs`` are done and the caller should ack them; False when they were
        acked here one by one, or the loop is stopping or stopped."""
        failure = await self._attempt(msgs)
        if failure is None:
            return True
        if failure is _STOPPING:
            return False
        if self._on_poison == "stop":
            await self._stop_for(failure)
            return False
        if isinstance(failure, PoisonMessages) and failure.msgs:
            bad = {id(m) for m in failure.msgs}
            for m in msgs:
                if id(m) in bad and not await self._give_up_on(m, failure):
                    return False
            rest = [m for m in msgs if id(m) not in bad]
            return await self._handle(rest) if rest else True
        if len(msgs) == 1:
            return await self._give_up_on(msgs[0], failure)
        log.warning(
            "%s: a batch of %d failed for good (%s); handling its messages one by one",
            self.durable,
            len(msgs),
            self.last_error,
        )
        for m in msgs:  # in order: what follows a poison message still flows
            one = await self._attempt([m])
            if one is _STOPPING:
                return False
            if one is not None and not await self._give_up_on(m, one):
                return False
            await self._acked([m])
        return False

    async def _attempt(self, msgs: list[Msg]) -> BaseException | None:
        """Runs the handler until it succeeds (None), fails for good (the error), or the
        loop is told to stop (``_STOPPING``). Transient failures are retried here."""
        self.attempts = 0
        while True:
            try:
                with telemetry.batch_span(
                    "myelin.consume",
                    f"consume {self.durable}",
                    [telemetry.span_context_of(m.headers) for m in msgs],
                    {
                        "messaging.destination.name": self.stream,
                        "messaging.consumer.group.name": self.durable,
                        "messaging.batch.message_count": len(msgs),
                    },
                ):
                    await self._handler(msgs)
                self.attempts = 0
                return None
            except Exception as exc:
                self.failures += 1
                self.attempts += 1
                self.last_error = f"{type(exc).__name__}: {exc}"[:500]
                kind = is_transient(exc)
                if kind is False or (kind is None and self.attempts >= self._unknown_attempts):
                    self.attempts = 0
                    return exc
                delay = backoff(self.attempts - 1, cap=self._max_backoff)
                level = logging.ERROR if self.attempts >= self._alert_after else logging.WARNING
                log.log(
                    level,
                    "%s: batch of %d failed (try %d, %s): %s; retrying in %.2fs",
                    self.durable,
                    len(msgs),
                    self.attempts,
                    "transient" if kind else "unclassified",
                    self.last_error,
                    delay,
                    exc_info=kind is None,
                )
                with contextlib.suppress(Exception):
                    await msgs[-1].in_progress()
                if await self._sleep(delay):
                    return _STOPPING

    async def _give_up_on(self, msg: Msg, exc: BaseException) -> bool:
        """Dead-letter and terminate one message; False if the loop is stopping first."""
        seq = msg.metadata.sequence.stream
        reason = exc.code if isinstance(exc, Poison) else "unprocessable"
        what = f"{type(exc).__name__}: {exc}"[:2000]
        attempt = 0
        while self._dead_letter is not None:
            try:
                await self._dead_letter(msg, reason, what)
                break
            except Exception as dl_exc:  # noqa: BLE001 - the DLQ must hold it before we let go
                if is_transient(dl_exc) is not True:
                    # A dead letter that cannot be written for what it is must not wedge the
                    # consumer: said loudly, counted, and the message terminated anyway.
                    self.dead_letter_failures += 1
                    log.error(
                        "%s: seq %d could not be dead-lettered (%r); terminated without a "
                        "dead letter",
                        self.durable,
                        seq,
                        dl_exc,
                    )
                    break
                log.warning("%s: cannot dead-letter seq %d yet: %r", self.durable, seq, dl_exc)
                if await self._sleep(backoff(attempt, cap=self._max_backoff)):
                    return False
                attempt += 1
        log.error("%s: stream seq %d dead-lettered and terminated: %s", self.durable, seq, what)
        with contextlib.suppress(Exception):
            await msg.term()
        self.dead_lettered += 1
        # done with, in order: what follows it is no gap (a terminated message never returns)
        self.position = max(self.position, seq)
        return True

    async def _stop_for(self, exc: BaseException) -> None:
        self.stopped_error = f"{type(exc).__name__}: {exc}"[:2000]
        log.error("%s: stopped: %s", self.durable, self.stopped_error, exc_info=exc)
        if self._on_stopped is not None:
            try:
                await self._on_stopped(exc)
            except Exception:
                log.exception("%s: reporting the stop failed", self.durable)

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopping; True if stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return self._stopping.is_set()

    def stop(self) -> None:
        self._stopping.set()


class _Stopping(Exception):
    """Marker: the loop was told to stop while retrying."""


_STOPPING = _Stopping()
