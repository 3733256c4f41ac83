"""Outbound adapter: partition leases for features workers, in a NATS KV bucket.

The bucket (``myelin_features_leases``) keeps each entry for ``MYELIN_FEATURES_LEASE_S``
after its last write (the bucket's TTL, i.e. the stream's max age: the server's clock, not
the workers'). Two kinds of keys:

- ``member.<worker>``: written every tick; the live members are the keys present (read
  from the bucket's stream info, one request);
- ``part.<p>``: the worker holding partition ``p``. Taken with ``create`` (only if no one
  holds it), renewed with ``update`` at the revision this worker last wrote (so a worker
  that lost it, e.g. paused past the TTL while another took it, finds out and stops), and
  given back with ``delete`` at that revision once the partition's consumer has stopped.

A worker killed with SIGKILL stops renewing: its leases and its member key vanish after
the TTL, the others' fair share grows (:mod:`services.features.assignment`) and they take
its partitions. A new worker joins as a member: the others' share shrinks, they give back
partitions, and it takes them. A partition's position and watermark live in Redis beside
its entities, and every batch is applied under the position guard, so a partition that
moves is resumed by its new owner right after the last batch applied, whoever applied it.
A worker that cannot reach NATS for longer than the TTL stops its partitions: another
worker may hold them by then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import (
    BadRequestError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
)

from myelin import bus
from myelin.topology import LEASES_BUCKET
from services.features.assignment import plan

log = logging.getLogger(__name__)
WRONG_LAST_SEQUENCE = 10071  # JetStream's error code: the key exists (someone holds it)
Change = Callable[[int], Awaitable[None]]


def worker_key(worker: str) -> str:
    return "member." + re.sub(r"[^-_A-Za-z0-9]", "_", worker)


async def leases_bucket(js: JetStreamContext, lease_s: float, replicas: int = 1) -> Any:
    return await bus.kv_bucket(js, LEASES_BUCKET, history=1, replicas=replicas, ttl_s=lease_s)


class PartitionLeases:
    """Holds this worker's share of ``partitions``; ``gain(p)`` starts a partition here,
    ``lose(p)`` stops it (and returns once nothing of it runs)."""

    def __init__(
        self,
        js: JetStreamContext,
        worker: str,
        partitions: int,
        lease_s: float,
        gain: Change,
        lose: Change,
        replicas: int = 1,
    ) -> None:
        self._js = js
        self.worker = worker
        self._member = worker_key(worker)
        self._partitions = partitions
        self.lease_s = lease_s
        self._gain = gain
        self._lose = lose
        self._replicas = replicas
        self._kv: Any = None
        self.held: dict[int, int] = {}  # partition -> revision of our lease
        self.members: list[str] = []
        self._ok_at = time.monotonic()  # the last tick that reached NATS
        self._adopted = False
        self.moves = 0  # partitions gained or lost so far
        self.last_error = ""

    @property
    def owned(self) -> list[int]:
        return sorted(self.held)

    async def open(self) -> None:
        self._kv = await leases_bucket(self._js, self.lease_s, self._replicas)

    async def confirm(self, p: int) -> bool:
        """Whether this worker holds partition ``p``'s lease on the server now (read, not
        remembered): a batch asks before it publishes anything, so a worker that was
        paused past its lease finds out before its stale results go out, not at its next
        renewal."""
        rev = self.held.get(p)
        if rev is None:
            return False
        try:
            entry = await self._kv.get(f"part.{p}")
        except KeyNotFoundError:
            return False  # expired (the TTL runs on the server's clock)
        return bool(entry.revision == rev)

    async def tick(self) -> None:
        """Heartbeat, renew, then rebalance (give back above the share, take free ones).

        Only direct reads and writes of keys (no watcher, no ephemeral consumer: those are
        slow to place while a JetStream cluster fails over)."""
        kv = self._kv
        started = time.monotonic()
        try:
            await kv.put(self._member, self.worker.encode())
        except Exception as exc:  # noqa: BLE001 - the renewals matter more: go on
            log.warning("%s: member heartbeat failed: %r", self.worker, exc)
        for p, rev in list(self.held.items()):
            try:
                self.held[p] = await kv.update(f"part.{p}", self.worker.encode(), last=rev)
            except (KeyWrongLastSequenceError, KeyNotFoundError, BadRequestError) as exc:
                code = getattr(exc, "err_code", WRONG_LAST_SEQUENCE)  # the key errors have none
                if isinstance(exc, BadRequestError) and code != WRONG_LAST_SEQUENCE:
                    raise
                log.warning("%s: lease of partition %d lost (taken over)", self.worker, p)
                del self.held[p]
                await self._changed(self._lose, p)
        self._ok_at = started  # every lease held is good for a TTL from (before) here
        info = await self._js.stream_info(
            f"KV_{LEASES_BUCKET}", subjects_filter=f"$KV.{LEASES_BUCKET}.member.>"
        )
        prefix = f"$KV.{LEASES_BUCKET}.member."
        self.members = sorted(k.removeprefix(prefix) for k in (info.state.subjects or {}))
        owners: dict[int, tuple[bytes, int]] = {}  # partition -> (holder, revision)
        for p in range(self._partitions):
            if p in self.held:
                continue
            try:
                entry = await kv.get(f"part.{p}")
                owners[p] = (entry.value or b"", entry.revision or 0)
            except KeyNotFoundError:  # never held, expired, or given back (deleted)
                continue
            except Exception as exc:  # noqa: BLE001 - unknown now: not taken this tick
                log.debug("%s: lease of partition %d not read: %r", self.worker, p, exc)
                owners[p] = (b"", 0)
        if not self._adopted:  # a restarted worker takes back what it held (same name)
            self._adopted = True
            for p, (owner, rev) in sorted(owners.items()):
                if owner == self.worker.encode():
                    self.held[p] = rev
                    del owners[p]
                    await self._changed(self._gain, p)
        me = self._member.removeprefix("member.")
        todo = plan(
            self._partitions, self.members, me, set(self.held), set(owners) | set(self.held)
        )
        for p in todo.release:
            await self._changed(self._lose, p)
            rev = self.held.pop(p)
            with contextlib.suppress(KeyWrongLastSequenceError, KeyNotFoundError):
                await kv.delete(f"part.{p}", last=rev)
        for p in todo.claim:
            try:
                self.held[p] = await kv.create(f"part.{p}", self.worker.encode())
            except KeyWrongLastSequenceError:
                continue  # another worker was quicker
            except BadRequestError as exc:
                if exc.err_code == WRONG_LAST_SEQUENCE:
                    continue  # the same, as the server words it after a failover
                raise
            await self._changed(self._gain, p)

    async def _changed(self, change: Change, p: int) -> None:
        self.moves += 1
        await change(p)

    async def run(self) -> None:
        """Tick every third of the lease until cancelled."""
        while True:
            try:
                await self.tick()
                self.last_error = ""
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - NATS trouble: tried again next tick
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("%s: lease tick failed: %s", self.worker, self.last_error)
                if self.held and time.monotonic() - self._ok_at > self.lease_s:
                    log.error(
                        "%s: leases not renewed for %.1fs: stopping partitions %s (another "
                        "worker may hold them now)",
                        self.worker,
                        time.monotonic() - self._ok_at,
                        self.owned,
                    )
                    for p in list(self.held):
                        del self.held[p]
                        await self._changed(self._lose, p)
            await asyncio.sleep(self.lease_s / 3)

    async def close(self) -> None:
        """Give every partition back and leave (the others take over at once)."""
        for p in list(self.held):
            await self._changed(self._lose, p)
            rev = self.held.pop(p)
            with contextlib.suppress(Exception):
                await self._kv.delete(f"part.{p}", last=rev)
        if self._kv is not None:
            with contextlib.suppress(Exception):
                await self._kv.delete(self._member)
