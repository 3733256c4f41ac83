"""A message a consumer can never process is dead-lettered and terminated; transient
failures are retried and reported; a failing feature view stops alone. Real nats-server
and redis-server, real consumers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import api

from myelin import bus
from myelin.consume import PullLoop, ensure_consumer
from myelin.contracts.registry import default_registry
from myelin.dead_letters import consumer_dead_letters
from myelin.errors import Retryable
from myelin.records import DeadLetter, LateEvents
from myelin.settings import Settings
from myelin.subjects import DLQ_STREAM, EVENTS_STREAM, LATE_STREAM, StreamSpec, ingest_subject
from services.features.event_dead_letters import event_dead_letters
from services.features.feature_rows import rows_publisher
from services.features.late_sink import late_publisher
from services.features.logic import WindowEngine
from services.features.online_store import OnlineStore
from services.features.pipeline import FeaturePipeline, ViewFailed
from services.features.views import USER_ACTIVITY
from services.ingest.app import IngestApp
from tests.helpers import stream_event

pytestmark = pytest.mark.integration
_mp = msgspec.msgpack.Encoder()
TEST_STREAM = "TEST_WORK"


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def dead_letters(nc: NATS, settings: Settings) -> list[DeadLetter]:
    js = bus.jetstream(nc, settings)
    n = (await js.stream_info(DLQ_STREAM)).state.messages
    if not n:
        return []
    sub = await js.pull_subscribe("myelin.dlq.>", stream=DLQ_STREAM)
    try:
        msgs = await sub.fetch(n, timeout=2)
        return [msgspec.msgpack.decode(m.data, type=DeadLetter) for m in msgs]
    finally:
        await sub.unsubscribe()


@pytest.fixture
async def work_stream(nc: NATS, settings: Settings) -> str:
    js = bus.jetstream(nc, settings)
    await bus.ensure_stream(js, StreamSpec(TEST_STREAM, ("test.work.>",)))
    await ensure_consumer(js, TEST_STREAM, "worker", ">", max_ack_pending=100, ack_wait_s=30)
    return TEST_STREAM


@pytest.fixture
async def run_loop() -> AsyncIterator[Callable[[PullLoop], None]]:
    tasks: list[tuple[PullLoop, asyncio.Task[None]]] = []

    def start(loop: PullLoop) -> None:
        tasks.append((loop, asyncio.create_task(loop.run())))

    yield start
    for loop, task in tasks:
        loop.stop()
        await asyncio.wait_for(task, 10)


async def test_a_message_that_always_fails_is_dead_lettered_and_the_rest_flows(
    nc: NATS, settings: Settings, work_stream: str, run_loop: Callable[[PullLoop], None]
) -> None:
    js = bus.jetstream(nc, settings)
    for body in (b"one", b"two", b"poison", b"three", b"four"):
        await js.publish("test.work.x", body)
    done: list[bytes] = []

    async def handler(msgs: list[Msg]) -> None:
        if any(m.data == b"poison" for m in msgs):
            raise KeyError("a bug this message triggers every time")
        done.extend(m.data for m in msgs)

    loop = PullLoop(
        js,
        work_stream,
        "worker",
        handler,
        batch=10,
        dead_letter=consumer_dead_letters(bus.Publisher(js, settings), "worker"),
        unknown_attempts=2,
    )
    run_loop(loop)
    await eventually(lambda: _true(len(done) == 4))
    assert done == [b"one", b"two", b"three", b"four"]  # in order, nothing lost or repeated
    [dl] = await dead_letters(nc, settings)
    assert dl.reason == "unprocessable" and "KeyError" in dl.message
    assert dl.detail["stream"] == TEST_STREAM and dl.detail["seq"] == "3"
    assert dl.detail["consumer"] == "worker"
    assert '"redacted":true' in dl.payload and "poison" not in dl.payload  # sanitized
    info = await js.consumer_info(work_stream, "worker")
    assert info.num_pending == 0 and info.num_ack_pending == 0  # terminated, nothing redelivered
    assert loop.dead_lettered == 1 and loop.state == "ok"


async def _true(value: bool) -> bool:
    return value


async def test_transient_failures_are_retried_and_reported_not_dead_lettered(
    nc: NATS, settings: Settings, work_stream: str, run_loop: Callable[[PullLoop], None]
) -> None:
    js = bus.jetstream(nc, settings)
    await js.publish("test.work.x", b"only")
    outage = asyncio.Event()
    seen_retrying = asyncio.Event()
    applied: list[bytes] = []

    async def handler(msgs: list[Msg]) -> None:
        if not outage.is_set():
            raise Retryable("the store is restarting")
        applied.extend(m.data for m in msgs)

    loop = PullLoop(js, work_stream, "worker", handler, batch=10, alert_after=3, max_backoff_s=0.05)
    run_loop(loop)

    async def retrying() -> bool:
        if loop.state == "retrying":
            seen_retrying.set()
        return seen_retrying.is_set()

    await eventually(retrying)
    assert "the store is restarting" in str(loop.snapshot()["error"]) and not loop.healthy
    outage.set()
    await eventually(lambda: _true(applied == [b"only"] and loop.state == "ok"))
    assert loop.dead_lettered == 0 and await dead_letters(nc, settings) == []


@pytest.fixture
async def ingest(nc: NATS, settings: Settings) -> AsyncIterator[IngestApp]:
    app = IngestApp(settings)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


def _click(event_id: bytes, user: bytes) -> bytes:
    now = int(time.time() * 1000)
    return (
        b'{"event_id":"'
        + event_id
        + b'","type":"click","schema_version":1,"event_time":'
        + str(now).encode()
        + b',"data":{"user_id":"'
        + user
        + b'","item_id":"i"}}'
    )


async def test_invalid_utf8_on_the_inbox_no_longer_wedges_it(
    ingest: IngestApp, nc: NATS, settings: Settings
) -> None:
    """On main this raised UnicodeDecodeError in the inbox consumer, retried forever: every
    later event stayed stuck behind it while status said ready."""
    js = bus.jetstream(nc, settings)
    await js.publish(ingest_subject("p1"), _click(b"bad-1", b"\xed\xa0\x80"))  # a lone surrogate
    await js.publish(ingest_subject("p1"), b"[" + _click(b"bad\xff2", b"u") + b"]")
    await js.publish(ingest_subject("p1"), _click(b"good-1", b"u1"))

    async def flowed() -> bool:
        return bool(ingest.status()["accepted"] == 1)

    await eventually(flowed)
    status = ingest.status()
    assert status["ready"] is True and status["rejected"] == 2
    letters = {d.event_id: d for d in await dead_letters(nc, settings)}
    assert letters["bad-1"].reason == "invalid_payload" and "UTF-8" in letters["bad-1"].message
    assert any(d.reason == "invalid_envelope" and "UTF-8" in d.message for d in letters.values())


def _events(seq0: int, n: int, t: int, user: str = "u") -> bytes:
    return _mp.encode([stream_event(f"e{seq0}-{i}", f"{user}{i}", t) for i in range(n)])


def _pipeline(
    redis_client: aioredis.Redis, nc: NATS, settings: Settings, engine: WindowEngine
) -> FeaturePipeline:
    js = bus.jetstream(nc, settings)
    pub = bus.Publisher(js, settings)
    return FeaturePipeline(
        engine,
        default_registry(),
        OnlineStore(redis_client, engine.view, 3600),
        rows_publisher(pub),
        late_sink=late_publisher(pub),
        dead_letters=event_dead_letters(pub, "test"),
    )


async def test_ten_thousand_late_events_in_one_batch_are_stored(
    redis_client: aioredis.Redis, nc: NATS, settings: Settings
) -> None:
    """On main the late sink put every late sequence in one header: past 64 KiB JetStream
    refused it, the refusal was retried forever and the view stopped for good."""
    now = int(time.time() * 1000)
    p = _pipeline(redis_client, nc, settings, WindowEngine(USER_ACTIVITY))
    await p.start()
    await p.process([(1, _events(1, 1, now, user="w"))])  # partition 0's watermark: now
    old = now - 3 * 3600_000  # far behind the watermark: late by the partition rule
    batch = [(seq, _events(seq, 100, old)) for seq in range(2, 102)]
    await asyncio.wait_for(p.process(batch), 60)
    assert p.stats.late == 10_000 and p.stats.position == 101
    js = bus.jetstream(nc, settings)
    sub = await js.pull_subscribe("myelin.late.>", stream=LATE_STREAM)
    msgs = await sub.fetch(100, timeout=2)
    late = [msgspec.msgpack.decode(m.data, type=LateEvents) for m in msgs]
    seqs = [s for b in late for s in b.seqs]
    assert len(seqs) == 10_000 and len(set(seqs)) == 10_000
    assert all(len(b.seqs) == len(b.events) for b in late)


class _BrokenOn(WindowEngine):
    """A view whose computation raises on one event (a stand-in for a bug in a view's
    code: the definitions the platform accepts are validated and smoke-run)."""

    def __init__(self, bad_event: str) -> None:
        super().__init__(msgspec.structs.replace(USER_ACTIVITY, name="user_activity_b"))
        self.bad_event = bad_event

    def apply(self, st: Any, seq: int, typ: str, t: int, payload: Any, event_id: str = "") -> int:
        if event_id == self.bad_event:
            raise ZeroDivisionError("division by zero in the view's code")
        return super().apply(st, seq, typ, t, payload, event_id)


async def test_a_failing_view_stops_alone_and_unreadable_input_is_dead_lettered(
    redis_client: aioredis.Redis,
    nc: NATS,
    settings: Settings,
    run_loop: Callable[[PullLoop], None],
) -> None:
    js = bus.jetstream(nc, settings)
    now = int(time.time() * 1000)
    await js.publish("myelin.events.0", _events(1, 2, now))
    await js.publish("myelin.events.0", b"\xc1 not msgpack")  # poison for every view
    await js.publish("myelin.events.0", _events(3, 2, now))
    stopped: list[BaseException] = []

    async def on_stopped(exc: BaseException) -> None:
        stopped.append(exc)

    loops = {}
    for name, engine in (("healthy", WindowEngine(USER_ACTIVITY)), ("broken", _BrokenOn("e3-1"))):
        await ensure_consumer(
            js, EVENTS_STREAM, name, "myelin.events.>", max_ack_pending=100, ack_wait_s=30
        )
        p = _pipeline(redis_client, nc, settings, engine)  # two views: their own online keys
        await p.start()

        async def handler(msgs: list[Msg], p: FeaturePipeline = p) -> None:
            await p.process([(m.metadata.sequence.stream, m.data) for m in msgs])

        loops[name] = (
            PullLoop(
                js, EVENTS_STREAM, name, handler, batch=1, on_poison="stop", on_stopped=on_stopped
            ),
            p,
        )
        run_loop(loops[name][0])
    healthy, hp = loops["healthy"]
    broken, bp = loops["broken"]
    await eventually(lambda: _true(hp.stats.position == 3 and broken.state == "stopped"))
    assert hp.stats.applied == 4 and hp.stats.undecodable == 1 and healthy.state == "ok"
    assert "ZeroDivisionError" in broken.stopped_error and bp.stats.position == 2
    assert len(stopped) == 1 and isinstance(stopped[0], ViewFailed)
    [dl] = await dead_letters(nc, settings)  # both views gave up on seq 2: stored once
    assert dl.reason == "undecodable" and dl.detail["seq"] == "2"


async def test_a_shared_consumer_never_acks_another_workers_unfinished_message(
    nc: NATS, settings: Settings
) -> None:
    """Found by the fault harness: with one AckPolicy.ALL consumer shared by two ingest
    workers, worker B's ack of a later message acknowledged the message worker A was
    killed in the middle of, and its events were lost. Shared consumers ack each message."""
    js = bus.jetstream(nc, settings)
    await bus.ensure_stream(js, StreamSpec(TEST_STREAM, ("test.work.>",)))
    await ensure_consumer(
        js, TEST_STREAM, "shared", ">", max_ack_pending=100, ack_wait_s=4, shared=True
    )
    await js.publish("test.work.x", b"first")
    held = asyncio.Event()

    async def stuck(msgs: list[Msg]) -> None:  # worker A: works on "first", then dies
        held.set()
        while True:
            await msgs[0].in_progress()  # still working: not redelivered yet
            await asyncio.sleep(0.5)

    a = PullLoop(js, TEST_STREAM, "shared", stuck, batch=1, shared=True)
    a_task = asyncio.create_task(a.run())
    await asyncio.wait_for(held.wait(), 10)
    done: list[bytes] = []

    async def works(msgs: list[Msg]) -> None:
        done.extend(m.data for m in msgs)

    b = PullLoop(js, TEST_STREAM, "shared", works, batch=10, shared=True)
    b_task = asyncio.create_task(b.run())
    await js.publish("test.work.x", b"second")
    await eventually(lambda: _true(b"second" in done))
    assert b"first" not in done  # A holds it (its ack wait has not passed)
    a_task.cancel()  # A is gone without acking "first": it must come again, to B
    with contextlib.suppress(asyncio.CancelledError):
        await a_task
    await eventually(lambda: _true(sorted(done) == [b"first", b"second"]))
    b.stop()
    await asyncio.wait_for(b_task, 10)


async def test_an_existing_ack_all_consumer_is_recreated_shared_where_it_stopped(
    nc: NATS, settings: Settings
) -> None:
    js = bus.jetstream(nc, settings)
    await bus.ensure_stream(js, StreamSpec(TEST_STREAM, ("test.work.>",)))
    await ensure_consumer(js, TEST_STREAM, "old", ">", max_ack_pending=100, ack_wait_s=30)
    for body in (b"1", b"2", b"3"):
        await js.publish("test.work.x", body)
    sub = await js.pull_subscribe_bind(durable="old", stream=TEST_STREAM)
    [m1, _m2] = await sub.fetch(2, timeout=2)
    await m1.ack_sync()  # ack floor 1; 2 was fetched, not acked
    await sub.unsubscribe()
    await ensure_consumer(
        js, TEST_STREAM, "old", ">", max_ack_pending=100, ack_wait_s=30, shared=True
    )
    info = await js.consumer_info(TEST_STREAM, "old")
    assert info.config.ack_policy == api.AckPolicy.EXPLICIT
    sub = await js.pull_subscribe_bind(durable="old", stream=TEST_STREAM)
    assert [m.data for m in await sub.fetch(5, timeout=2)] == [b"2", b"3"]


@pytest.mark.parametrize("in_order", [True, False], ids=["in-order", "control"])
async def test_messages_lost_on_the_way_are_not_acked_unread(
    nc: NATS, settings: Settings, run_loop: Callable[[PullLoop], None], in_order: bool
) -> None:
    """A fetch whose messages never reach the consumer's handler (a JetStream cluster
    failing over, a connection dropped mid-fetch) leaves them pending while later ones
    arrive. The loop restarts the consumer after the last message it handled, so every
    message is handled once, in order, without waiting for the ack wait. The control (the
    check off) acks the later ones first, and with AckPolicy.ALL that acknowledges the
    lost ones unread: they are never handled. The e2e cluster test found this."""
    js = bus.jetstream(nc, settings)
    await bus.ensure_stream(js, StreamSpec("TEST_GAPS", ("test.gaps.>",)))
    await ensure_consumer(js, "TEST_GAPS", "gapped", ">", max_ack_pending=100, ack_wait_s=1.0)
    for i in range(30):
        await js.publish(f"test.gaps.{i % 3}", str(i + 1).encode())
    lost = await js.pull_subscribe_bind(durable="gapped", stream="TEST_GAPS")
    assert len(await lost.fetch(10, timeout=2)) == 10  # delivered, never handled nor acked
    await lost.unsubscribe()

    seen: list[int] = []

    async def handle(msgs: list[Msg]) -> None:
        seen.extend(int(m.data) for m in msgs)

    loop = PullLoop(js, "TEST_GAPS", "gapped", handle, batch=5, in_order=in_order)
    run_loop(loop)
    if in_order:
        await eventually(lambda: _true(len(seen) >= 30), timeout_s=0.9)  # < the ack wait
        assert seen == list(range(1, 31)) and loop.rewinds == 1
    else:
        await eventually(lambda: _true(len(seen) >= 20))
        await asyncio.sleep(2.5)  # longer than the ack wait: the lost ones would be back
        assert seen == list(range(11, 31))  # 1..10 acknowledged unread, never handled


async def test_a_delivery_lost_mid_run_is_delivered_again_in_order(
    nc: NATS, settings: Settings, run_loop: Callable[[PullLoop], None]
) -> None:
    """Deliveries lost while the loop runs (here another subscription takes a fetch's worth
    of them from under it, as an orphaned pull request does after a failover) show as a
    jump in the consumer sequence: the loop handles what came before, restarts the
    consumer after it, and every message is handled exactly once, in order."""
    js = bus.jetstream(nc, settings)
    await bus.ensure_stream(js, StreamSpec("TEST_GAPS2", ("test.gaps2.>",)))
    await ensure_consumer(js, "TEST_GAPS2", "gapped", ">", max_ack_pending=1000, ack_wait_s=30)
    for i in range(20):
        await js.publish("test.gaps2.x", str(i + 1).encode())
    seen: list[int] = []
    first_batch = asyncio.Event()
    go_on = asyncio.Event()

    async def handle(msgs: list[Msg]) -> None:
        seen.extend(int(m.data) for m in msgs)
        if not first_batch.is_set():
            first_batch.set()
            await go_on.wait()

    loop = PullLoop(js, "TEST_GAPS2", "gapped", handle, batch=5)
    run_loop(loop)
    await asyncio.wait_for(first_batch.wait(), 10)
    # a stranger takes some of the next deliveries (the server shares them between its pull
    # request and the loop's fetch-ahead)
    thief = await js.pull_subscribe_bind(durable="gapped", stream="TEST_GAPS2")
    stolen = await thief.fetch(4, timeout=2)
    await thief.unsubscribe()
    go_on.set()
    await eventually(lambda: _true(len(seen) >= 20), timeout_s=10)  # < the ack wait of 30 s
    assert len(stolen) == 4 and all(m.metadata.sequence.stream > 5 for m in stolen)
    assert seen == list(range(1, 21)) and loop.gaps >= 1 and loop.rewinds >= 1


async def test_a_filtered_consumer_flows_past_other_subjects(
    nc: NATS, settings: Settings, run_loop: Callable[[PullLoop], None]
) -> None:
    """A consumer that reads one subject of a stream sees stream sequences with holes (the
    other subjects' messages): that is no lost delivery, and the loop must not stall on it
    (an earlier gap check by stream sequence did)."""
    js = bus.jetstream(nc, settings)
    await bus.ensure_stream(js, StreamSpec("TEST_GAPS3", ("test.gaps3.>",)))
    await ensure_consumer(
        js, "TEST_GAPS3", "odd", "test.gaps3.odd", max_ack_pending=100, ack_wait_s=30
    )
    for i in range(1, 41):
        await js.publish(f"test.gaps3.{'odd' if i % 2 else 'even'}", str(i).encode())
    seen: list[int] = []

    async def handle(msgs: list[Msg]) -> None:
        seen.extend(int(m.data) for m in msgs)

    loop = PullLoop(js, "TEST_GAPS3", "odd", handle, batch=4)
    run_loop(loop)
    await eventually(lambda: _true(len(seen) >= 20), timeout_s=10)
    await asyncio.sleep(0.3)
    assert seen == list(range(1, 41, 2)) and loop.gaps == 0 and loop.rewinds == 0
