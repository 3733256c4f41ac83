"""Outbound adapter: deleting a data subject's rows (``myelin.rpc.warehouse.erase``, asked
by governance's erasure). Synchronous mutations: the rows are gone when it answers.

A drain may still insert a row of the subject that was in flight (read from its stream
before the erasure): the delete is repeated once the drains have had time to land it.
"""

from __future__ import annotations

import asyncio
import json

from myelin.warehouse import DATABASE
from services.warehouse.sink import WarehouseSink

SECOND_PASS_S = 2.0  # longer than a drain's linger and one insert


def _literal(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def conditions(subject: str) -> dict[str, str]:
    """Each table that can hold the subject, and how its rows are found."""
    s = _literal(subject)
    quoted = _literal(json.dumps(subject))
    return {
        "events": f"entity_id = {s}",
        "feature_values": f"entity_id = {s}",
        "inferences": f"entity_id = {s}",
        # a rejected event is stored as sent (PII tokenized): the subject's id is a JSON string
        "dead_letters": f"position(payload, {quoted}) > 0",
    }


def _erase(sink: WarehouseSink, subject: str) -> dict[str, int]:
    wh = sink.wh
    deleted: dict[str, int] = {}
    for table, where in conditions(subject).items():
        found = wh.query_arrow(f"SELECT count() AS n FROM {DATABASE}.{table} WHERE {where}")
        n = int(found.column("n")[0].as_py())
        if n:
            wh.command(
                f"ALTER TABLE {DATABASE}.{table} DELETE WHERE {where} SETTINGS mutations_sync = 2"
            )
        deleted[table] = n
    return deleted


async def erase_subject(sink: WarehouseSink, subject: str) -> dict[str, int]:
    """Delete the subject's rows from every table that holds them; rows deleted per table."""
    first: dict[str, int] = await sink.run(_erase, sink, subject)
    await asyncio.sleep(SECOND_PASS_S)
    second: dict[str, int] = await sink.run(_erase, sink, subject)
    return {t: first[t] + second.get(t, 0) for t in first}
