"""warehouse: the one process that owns the embedded ClickHouse (chdb).

It drains EVENTS (raw history), LATE, FEATURES (offline feature values), INFERENCES,
AUDIT and the DLQ into ClickHouse tables, answers read-only SQL over NATS, and re-drains
EVENTS from a sequence when a replay asks. With a ClickHouse server (MYELIN_CLICKHOUSE_URL)
the same code writes to the server.
"""
