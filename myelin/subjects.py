"""Streams, subjects, buckets and request-reply endpoints: the wire map of the platform.

Changing a name here is a breaking change for every producer and consumer.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

EVENTS_STREAM = "MYELIN_EVENTS"
INGEST_STREAM = "MYELIN_INGEST"  # raw events straight from any NATS client, validated by ingest
DLQ_STREAM = "MYELIN_DLQ"
LATE_STREAM = "MYELIN_LATE"  # events too late for a view's windows (still in ClickHouse history)
INFERENCES_STREAM = "MYELIN_INFERENCES"
AUDIT_STREAM = "MYELIN_AUDIT"
FEATURES_STREAM = "MYELIN_FEATURES"  # offline feature values, drained into ClickHouse
DRIFT_STREAM = "MYELIN_DRIFT"  # DriftDetected: a served model version left its reference

MODELS_BUCKET = "myelin_models"
VIEWS_BUCKET = "myelin_views"  # feature view versions, key ``<view>.<hash>``, written once
ARTIFACTS_BUCKET = "myelin_model_artifacts"
RETRAINS_BUCKET = "myelin_retrains"  # retrain jobs by id (myelin.retraining), claimed by create

RPC_INGEST_PUBLISH = "myelin.rpc.ingest.publish"
RPC_GOVERNANCE_DECIDE = "myelin.rpc.governance.decide"
# the registry owner: governance decides and moves a model's aliases and routes
RPC_GOVERNANCE_PROMOTE = "myelin.rpc.governance.promote"
RPC_GOVERNANCE_ROUTES = "myelin.rpc.governance.routes"
RPC_GOVERNANCE_ROLLBACK = "myelin.rpc.governance.rollback"
# the right to be forgotten: governance decides, destroys the subject's key, and has
# features and the warehouse delete what they hold of the subject
RPC_GOVERNANCE_ERASE = "myelin.rpc.governance.erase"
RPC_FEATURES_ERASE = "myelin.rpc.features.erase"
RPC_WAREHOUSE_ERASE = "myelin.rpc.warehouse.erase"
RPC_WAREHOUSE_QUERY = "myelin.rpc.warehouse.query"
RPC_WAREHOUSE_REWIND = "myelin.rpc.warehouse.rewind"  # re-drain EVENTS from a sequence
RPC_FEATURES_REPLAY = "myelin.rpc.features.replay"
RPC_FEATURES_CHECK = "myelin.rpc.features.check"
RPC_FEATURES_VIEWS = "myelin.rpc.features.views"  # list, register, promote, retire versions


def health_subject(service: str) -> str:
    return f"myelin.rpc.health.{service}"


def ingest_subject(producer: str) -> str:
    """Where a producer without the SDK publishes raw JSON events (one or an array)."""
    return f"myelin.ingest.{producer}"


def event_subject(partition: int) -> str:
    """``myelin.events.<partition>``. A message holds events of one partition, in the order
    they were sent, so each entity's events keep their order (an entity has one partition)."""
    return f"myelin.events.{partition}"


def partition_of(key: str, partitions: int) -> int:
    """An entity's partition: ``crc32(key) mod partitions`` (ingest routes by it, the online
    store keeps the entity's record under it)."""
    return zlib.crc32(key.encode()) % partitions


def dlq_subject(reason: str) -> str:
    return f"myelin.dlq.{reason}"


def late_subject(view: str) -> str:
    return f"myelin.late.{view}"


def feature_subject(view: str, version: str) -> str:
    return f"myelin.features.{view}.{version}"


def inference_subject(model: str) -> str:
    return f"myelin.inferences.{model}"


def drift_subject(model: str) -> str:
    return f"myelin.drift.{model}"


def audit_subject(action: str) -> str:
    return f"myelin.audit.{action}"


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    duplicate_window_s: float = 120.0
    max_age_s: float = 0.0  # 0 = keep forever (replayable history)


def stream_specs(duplicate_window_s: float) -> list[StreamSpec]:
    """The platform's streams and their subjects (retention: :mod:`myelin.retention`,
    applied by :func:`myelin.topology.streams`)."""
    return [
        StreamSpec(INGEST_STREAM, ("myelin.ingest.>",), duplicate_window_s),
        StreamSpec(EVENTS_STREAM, ("myelin.events.>",), duplicate_window_s),
        StreamSpec(DLQ_STREAM, ("myelin.dlq.>",), duplicate_window_s),
        StreamSpec(LATE_STREAM, ("myelin.late.>",), duplicate_window_s),
        StreamSpec(INFERENCES_STREAM, ("myelin.inferences.>",), duplicate_window_s),
        StreamSpec(AUDIT_STREAM, ("myelin.audit.>",), duplicate_window_s),
        StreamSpec(DRIFT_STREAM, ("myelin.drift.>",), duplicate_window_s),
        StreamSpec(FEATURES_STREAM, ("myelin.features.>",), duplicate_window_s),
    ]
