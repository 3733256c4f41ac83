"""Inbound adapter: read-only SQL over NATS, for analysts, the CLI and other services
(embedded mode, where this process owns chdb). Results come back as JSON rows or as an
Arrow IPC stream (base64), capped in rows and bytes with a clear error past the cap.

Personal data stays sealed (``pii:subject:...`` tokens) unless the request asks to
``reveal_pii`` with a ``purpose`` and governance's ``pii_read`` policy allows the caller's
role: then every token whose subject still has a key is opened in the JSON rows. The
decision, allowed or not, is audited."""

from __future__ import annotations

import base64
from typing import Any, Literal

import msgspec
from nats.aio.client import Client as NATS

from myelin import access, bus
from myelin.decisions import GovernanceClient
from myelin.errors import MyelinError
from myelin.pii import TOKEN_PREFIX
from myelin.subject_keys import SubjectKeys
from myelin.subjects import RPC_WAREHOUSE_QUERY
from myelin.warehouse import QueryRejected, arrow_to_ipc, read_only_sql
from services.warehouse.sink import WarehouseSink

MAX_REPLY_BYTES = 12 * 1024 * 1024


class QueryRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    sql: str
    format: Literal["json", "arrow"] = "json"
    max_rows: int = 10_000
    reveal_pii: bool = False  # open PII tokens (JSON rows only), if pii_read allows
    purpose: str = ""  # why, for pii_read and the audit trail


class PiiReadDenied(MyelinError):
    code = "pii_read_denied"


async def _revealed(
    rows: list[dict[str, Any]], keys: SubjectKeys
) -> tuple[list[dict[str, Any]], int]:
    """The rows with every openable PII token replaced by its value; how many were."""
    texts = [v for row in rows for v in row.values() if isinstance(v, str) and TOKEN_PREFIX in v]
    opened = await keys.reveal(texts)
    if not opened:
        return rows, 0

    def open_all(value: Any) -> Any:
        if not isinstance(value, str) or TOKEN_PREFIX not in value:
            return value
        for token, plain in opened.items():
            if token in value:
                value = value.replace(token, plain)
        return value

    return [{k: open_all(v) for k, v in row.items()} for row in rows], len(opened)


_dec = msgspec.json.Decoder(QueryRequest)


async def serve_sql(
    nc: NATS,
    sink: WarehouseSink,
    keys: SubjectKeys | None = None,
    governance: GovernanceClient | None = None,
) -> Any:
    """``keys`` and ``governance``: what an allowed PII read needs (without them no read
    can reveal personal data)."""

    async def handle(data: bytes, headers: dict[str, str]) -> dict[str, Any]:
        req = bus.decode_request(_dec, data, "query")
        if req.reveal_pii:
            await _may_read_pii(req, headers.get(bus.CALLER, ""))
        sql = read_only_sql(req.sql)
        table = await sink.query(sql)
        if table.num_rows > req.max_rows:
            raise QueryRejected(
                f"{table.num_rows} rows exceed max_rows={req.max_rows}: add a LIMIT or raise max_rows",
                rows=table.num_rows,
            )
        if req.format == "arrow":
            blob = arrow_to_ipc(table)
            if len(blob) > MAX_REPLY_BYTES:
                raise QueryRejected(
                    f"result is {len(blob)} bytes compressed; the cap is {MAX_REPLY_BYTES}"
                )
            return {"rows": table.num_rows, "arrow_b64": base64.b64encode(blob).decode()}
        rows = table.to_pylist()
        if req.reveal_pii:
            assert keys is not None
            rows, opened = await _revealed(rows, keys)
            return {
                "rows": table.num_rows,
                "columns": table.column_names,
                "data": rows,
                "pii_opened": opened,
            }
        return {"rows": table.num_rows, "columns": table.column_names, "data": rows}

    async def _may_read_pii(req: QueryRequest, caller: str) -> None:
        if req.format != "json":
            raise QueryRejected("personal data is revealed in JSON rows only (format=json)")
        if keys is None or governance is None:
            raise PiiReadDenied("this warehouse cannot reveal personal data (no subject keys)")
        verdict = await governance.decide(
            "pii_read",
            "warehouse.query",
            {
                "role": access.role_of(caller),
                "purpose": req.purpose,
                "requester": caller,
                "sql": req.sql[:2000],
            },
        )
        if not verdict.allow:
            raise PiiReadDenied(
                f"reading personal data was denied: {'; '.join(verdict.reasons)}",
                decision_id=verdict.decision_id,
            )

    return await bus.serve(nc, RPC_WAREHOUSE_QUERY, handle, queue="warehouse")
