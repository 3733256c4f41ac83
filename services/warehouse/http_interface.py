"""Inbound adapter: the ClickHouse HTTP interface, read-only, in front of the warehouse
engine (chdb embedded, or the ClickHouse server named by ``MYELIN_CLICKHOUSE_URL``), so
``clickhouse-connect``, ``curl`` and BI tools work unchanged.

What it speaks (https://clickhouse.com/docs/interfaces/http):
- ``GET`` or ``POST /``: the query in the ``query`` parameter, the body, or both (the body
  follows the parameter's text, as ClickHouse joins them);
- ``FORMAT`` clauses, else ``default_format``, else ``TabSeparated``; every output format
  of the engine (clickhouse-connect uses ``Native`` and ``ArrowStream``);
- ``param_<name>`` query parameters for ``{name:Type}`` placeholders;
- any other parameter is a setting (``max_result_rows=10``), applied to that query only;
  ``database``; and the ones that only shape the HTTP exchange (``query_id``,
  ``session_id``, ``compress``, ``wait_end_of_query`` ...) are accepted and ignored;
- ``/ping`` and ``GET /`` answer ``Ok.``; gzip / deflate responses when the client asks
  with ``enable_http_compression=1``;
- errors as ClickHouse writes them: ``Code: N. DB::Exception: ...`` with
  ``X-ClickHouse-Exception-Code`` and the HTTP status ClickHouse gives that code.

Every query runs through :mod:`myelin.sql_guard` (``readonly = 1``, one statement, no
``INTO OUTFILE``). The warehouse binds this port to ``MYELIN_HOST`` (loopback by default).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Mapping

import msgspec
from aiohttp import web

from myelin.sql_guard import LIMITS, QueryRejected, check_format, read_only_query
from myelin.warehouse import RawResult, WarehouseError
from services.warehouse.sink import WarehouseSink

log = logging.getLogger(__name__)

SERVER_NAME = "myelin-warehouse"
MAX_BODY_BYTES = 1024 * 1024  # a query, not data: this interface takes no inserts
# the result is built in memory before it is sent: the guard's engine-side cap, checked again
MAX_RESULT_BYTES = LIMITS["max_result_bytes"]
# Parameters that shape the HTTP exchange, not the query (ClickHouse's own list).
_EXCHANGE = frozenset(
    {
        "query",
        "database",
        "default_format",
        "query_id",
        "session_id",
        "session_timeout",
        "session_check",
        "compress",
        "decompress",
        "user",
        "password",
        "quota_key",
        "buffer_size",
        "wait_end_of_query",
        "enable_http_compression",
        "http_zlib_compression_level",
        "send_progress_in_http_headers",
        "http_headers_progress_interval_ms",
        "client_protocol_version",
        "role",
        "stacktrace",
    }
)
_CONTENT_TYPES = {
    "TabSeparated": "text/tab-separated-values; charset=UTF-8",
    "TSV": "text/tab-separated-values; charset=UTF-8",
    "CSV": "text/csv; charset=UTF-8; header=absent",
    "CSVWithNames": "text/csv; charset=UTF-8; header=present",
    "JSON": "application/json; charset=UTF-8",
    "JSONCompact": "application/json; charset=UTF-8",
    "JSONEachRow": "application/x-ndjson; charset=UTF-8",
}
# ClickHouse's HTTP status for an error code (src/Server/HTTPHandler.cpp), by kind.
_STATUS_BY_CODE = {
    62: 400,  # SYNTAX_ERROR
    27: 400,  # CANNOT_PARSE_INPUT_ASSERTION_FAILED
    38: 400,  # CANNOT_PARSE_DATE
    41: 400,  # CANNOT_PARSE_DATETIME
    43: 400,  # ILLEGAL_TYPE_OF_ARGUMENT
    47: 404,  # UNKNOWN_IDENTIFIER
    46: 404,  # UNKNOWN_FUNCTION
    60: 404,  # UNKNOWN_TABLE
    73: 404,  # UNKNOWN_FORMAT
    81: 404,  # UNKNOWN_DATABASE
    115: 400,  # UNKNOWN_SETTING
    164: 403,  # READONLY
    396: 500,  # TOO_MANY_ROWS_OR_BYTES
    456: 400,  # UNKNOWN_QUERY_PARAMETER
    457: 400,  # BAD_QUERY_PARAMETER
}
_CODE = re.compile(r"Code: (\d+)\.")
_summary = msgspec.json.Encoder()


def _exception_text(code: int, message: str) -> str:
    return f"Code: {code}. DB::Exception: {message}. ({SERVER_NAME})\n"


def _error(code: int, message: str, query_id: str) -> web.Response:
    body = message if message.startswith("Code: ") else _exception_text(code, message)
    return web.Response(
        status=_STATUS_BY_CODE.get(code, 500),
        text=body if body.endswith("\n") else body + "\n",
        content_type="text/plain",
        headers={
            "X-ClickHouse-Exception-Code": str(code),
            "X-ClickHouse-Server-Display-Name": SERVER_NAME,
            "X-ClickHouse-Query-Id": query_id,
        },
    )


def split_params(params: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(query parameters by name without ``param_``, settings) from the URL parameters."""
    binds: dict[str, str] = {}
    settings: dict[str, str] = {}
    for name, value in params.items():
        if name.startswith("param_"):
            binds[name[len("param_") :]] = value
        elif name not in _EXCHANGE:
            settings[name] = value
    return binds, settings


def clickhouse_http_app(sink: WarehouseSink) -> web.Application:
    async def ok(_request: web.Request) -> web.Response:
        return web.Response(text="Ok.\n")

    async def handle(request: web.Request) -> web.StreamResponse:
        params = request.query
        query_id = params.get("query_id") or str(uuid.uuid4())
        if request.method == "GET" and "query" not in params:
            return await ok(request)
        try:
            raw = await request.read()  # the whole body (client_max_size bounds it)
        except web.HTTPRequestEntityTooLarge:
            return _error(
                62,
                f"the request body is over {MAX_BODY_BYTES} bytes: this server takes queries, "
                "not data",
                query_id,
            )
        if request.headers.get("Content-Encoding", "identity") not in ("identity", ""):
            return _error(
                1, "compressed request bodies are not supported: send the query plain", query_id
            )
        try:
            body = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return _error(62, f"the query is not UTF-8 text: {exc}", query_id)
        text = "\n".join(t for t in (params.get("query", ""), body) if t)
        binds, settings = split_params(params)
        try:
            q = read_only_query(text, settings)
            fmt = check_format(q.fmt or params.get("default_format") or "TabSeparated")
        except QueryRejected as exc:
            return _error(exc.ch_code, str(exc), query_id)
        started = time.perf_counter()
        try:
            result: RawResult = await sink.run(
                sink.wh.query_raw, q.sql, fmt, binds, params.get("database") or None
            )
        except WarehouseError as exc:
            message = str(exc)
            m = _CODE.search(message)
            return _error(int(m.group(1)) if m else 1000, message, query_id)
        if len(result.data) > MAX_RESULT_BYTES:
            return _error(
                396,
                f"the result is {len(result.data)} bytes; at most {MAX_RESULT_BYTES} are "
                "sent: add a LIMIT or aggregate",
                query_id,
            )
        elapsed_ns = int((time.perf_counter() - started) * 1e9)
        summary = {
            "read_rows": str(result.rows_read),
            "read_bytes": str(result.bytes_read),
            "written_rows": "0",
            "written_bytes": "0",
            "total_rows_to_read": str(result.rows_read),
            "result_bytes": str(len(result.data)),
            "elapsed_ns": str(elapsed_ns),
        }
        resp = web.Response(
            body=result.data,
            headers={
                "Content-Type": _CONTENT_TYPES.get(fmt, "application/octet-stream"),
                "X-ClickHouse-Server-Display-Name": SERVER_NAME,
                "X-ClickHouse-Query-Id": query_id,
                "X-ClickHouse-Format": fmt,
                "X-ClickHouse-Timezone": "UTC",
                "X-ClickHouse-Summary": _summary.encode(summary).decode(),
            },
        )
        if params.get("enable_http_compression") == "1":
            resp.enable_compression()  # gzip or deflate, as Accept-Encoding allows
        return resp

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_get("/ping", ok)
    app.router.add_route("GET", "/", handle)
    app.router.add_route("POST", "/", handle)
    return app


async def serve_clickhouse_http(sink: WarehouseSink, host: str, port: int) -> web.AppRunner:
    """Started and listening on ``host:port``; ``await runner.cleanup()`` stops it."""
    runner = web.AppRunner(clickhouse_http_app(sink), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("ClickHouse HTTP interface on http://%s:%d", host, port)
    return runner
