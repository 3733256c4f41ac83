"""features: event stream -> windowed per-entity features (Redis online, ClickHouse offline).

This service also owns the embedded warehouse (chdb): it drains EVENTS, INFERENCES,
AUDIT and the DLQ into ClickHouse tables and answers read-only SQL over NATS.
"""
