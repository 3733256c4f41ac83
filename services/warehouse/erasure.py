"""Outbound adapter: deleting a data subject's rows (``myelin.rpc.warehouse.erase``, asked
by governance's erasure). Synchronous mutations: the rows are gone when it answers.

A drain may still insert a row of the subject that was in flight (read from its stream
before the erasure): the delete is repeated once the drains have had time to land it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable

import msgspec

from myelin.warehouse import DATABASE
from services.warehouse.sink import WarehouseSink

SECOND_PASS_S = 2.0  # longer than a drain's linger and one insert


def _literal(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def conditions(subject: str, key_fields: Iterable[str]) -> dict[str, str]:
    """Each table that can hold the subject, and how its rows are found. A dead letter is
    the rejected event as sent (compact JSON, PII tokenized): it is the subject's when one
    of the contracts' key fields holds the subject's id."""
    s = _literal(subject)
    value = msgspec.json.encode(subject).decode()  # as msgspec wrote it: UTF-8, not \u escapes
    dlq = " OR ".join(
        f"position(payload, {_literal(f'{json.dumps(field)}:{value}')}) > 0"
        for field in sorted(set(key_fields))
    )
    return {
        "events": f"entity_id = {s}",
        "feature_values": f"entity_id = {s}",
        "inferences": f"entity_id = {s}",
        "dead_letters": dlq or "0",
    }


def _erase(sink: WarehouseSink, subject: str, key_fields: list[str]) -> dict[str, int]:
    wh = sink.wh
    deleted: dict[str, int] = {}
    for table, where in conditions(subject, key_fields).items():
        found = wh.query_arrow(f"SELECT count() AS n FROM {DATABASE}.{table} WHERE {where}")
        n = int(found.column("n")[0].as_py())
        if n:
            wh.command(
                f"ALTER TABLE {DATABASE}.{table} DELETE WHERE {where} SETTINGS mutations_sync = 2"
            )
        deleted[table] = n
    return deleted


async def erase_subject(sink: WarehouseSink, subject: str, key_fields: list[str]) -> dict[str, int]:
    """Delete the subject's rows from every table that holds them; rows deleted per table.
    ``key_fields``: the key field of every contract (where a dead letter names its subject)."""
    first: dict[str, int] = await sink.run(_erase, sink, subject, key_fields)
    await asyncio.sleep(SECOND_PASS_S)
    second: dict[str, int] = await sink.run(_erase, sink, subject, key_fields)
    return {t: first[t] + second.get(t, 0) for t in first}
