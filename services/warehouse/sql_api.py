"""Inbound adapter: read-only SQL over NATS, for analysts, the CLI and other services
(embedded mode, where this process owns chdb). Results come back as JSON rows or as an
Arrow IPC stream (base64), capped in rows and bytes with a clear error past the cap."""

from __future__ import annotations

import base64
from typing import Any, Literal

import msgspec
from nats.aio.client import Client as NATS

from myelin import bus
from myelin.subjects import RPC_WAREHOUSE_QUERY
from myelin.warehouse import QueryRejected, arrow_to_ipc, read_only_sql
from services.warehouse.sink import WarehouseSink

MAX_REPLY_BYTES = 12 * 1024 * 1024


class QueryRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    sql: str
    format: Literal["json", "arrow"] = "json"
    max_rows: int = 10_000


_dec = msgspec.json.Decoder(QueryRequest)


async def serve_sql(nc: NATS, sink: WarehouseSink) -> Any:
    async def handle(data: bytes, _headers: dict[str, str]) -> dict[str, Any]:
        req = bus.decode_request(_dec, data, "query")
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
        return {"rows": table.num_rows, "columns": table.column_names, "data": table.to_pylist()}

    return await bus.serve(nc, RPC_WAREHOUSE_QUERY, handle, queue="warehouse")
