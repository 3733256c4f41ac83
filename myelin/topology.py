"""The platform's JetStream topology, in one place: streams and their subjects, KV buckets,
object stores and the durable consumers whose names and settings do not depend on what
is registered at run time. ``bus.provision`` and the services create what is here; the
Terraform modules declare the same from ``infra/terraform/topology.json``, which
``python -m myelin.topology`` writes from this module (a test keeps them equal).

Not here, on purpose: the features consumers, one per view version and partition
(``features-<view>-<hash>-p<p>``). They exist only while a registered version runs, and
the features workers create and delete them.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from myelin import retention
from myelin.settings import Settings
from myelin.subjects import (
    ARTIFACTS_BUCKET,
    AUDIT_STREAM,
    DLQ_STREAM,
    DRIFT_STREAM,
    EVENTS_STREAM,
    FEATURES_STREAM,
    INFERENCES_STREAM,
    INGEST_STREAM,
    LATE_STREAM,
    MODELS_BUCKET,
    RETRAINS_BUCKET,
    VIEWS_BUCKET,
    StreamSpec,
    stream_specs,
)

CONTRACTS_BUCKET = "myelin_contracts"
LEASES_BUCKET = "myelin_features_leases"
SUBJECT_KEYS_BUCKET = "myelin_subject_keys"  # per-subject PII keys (myelin.subject_keys)
TERRAFORM_FILE = Path(__file__).resolve().parents[1] / "infra" / "terraform" / "topology.json"


@dataclass(frozen=True)
class Bucket:
    """A KV bucket: ``history`` values kept per key; ``ttl_s`` (0: none) expires keys."""

    name: str
    history: int = 1
    ttl_s: float = 0.0
    # its messages may be deleted one by one (a secure erase), which KV buckets refuse by
    # default: the subject keys, destroyed on erasure
    erasable: bool = False


@dataclass(frozen=True)
class Durable:
    """A durable pull consumer with a fixed name. ``shared``: several processes pull from
    it (explicit acks); otherwise one owner acks in order (``ack all``)."""

    name: str
    stream: str
    filter_subject: str
    max_ack_pending: int
    ack_wait_s: float
    owner: str  # the service that creates and consumes it
    shared: bool = False


def streams(settings: Settings) -> list[StreamSpec]:
    """Every stream, with its retention from :mod:`myelin.retention`."""
    return [
        replace(spec, max_age_s=retention.stream_max_age_s(spec.name))
        for spec in stream_specs(settings.duplicate_window_s)
    ]


def buckets(settings: Settings) -> list[Bucket]:
    return [
        Bucket(MODELS_BUCKET, history=16),
        Bucket(VIEWS_BUCKET),
        Bucket(CONTRACTS_BUCKET),
        Bucket(RETRAINS_BUCKET, history=8),
        Bucket(LEASES_BUCKET, ttl_s=settings.features_lease_s),
        Bucket(SUBJECT_KEYS_BUCKET, erasable=True),
    ]


OBJECT_STORES = (ARTIFACTS_BUCKET,)

# The warehouse's drains: stream -> durable (batch sizes: warehouse_batch)
WAREHOUSE_DRAINS = {
    EVENTS_STREAM: "warehouse-events",
    LATE_STREAM: "warehouse-late",
    FEATURES_STREAM: "warehouse-features",
    INFERENCES_STREAM: "warehouse-inferences",
    AUDIT_STREAM: "warehouse-audit",
    DLQ_STREAM: "warehouse-dlq",
    DRIFT_STREAM: "warehouse-drift",
}
WAREHOUSE_ACK_WAIT_S = 30.0
RETRAINER_DURABLE = "retrainer-drift"
RETRAINER_ACK_WAIT_S = 60.0  # a retrain job can take this long between progress acks
INGEST_INBOX = "ingest-inbox"


def warehouse_batch(stream: str, settings: Settings) -> int:
    """Messages per drain batch: EVENTS messages hold up to 100 events each."""
    return {
        EVENTS_STREAM: 5 * settings.features_batch,
        FEATURES_STREAM: 100,
        DRIFT_STREAM: 100,
    }.get(stream, 1000)


def durables(settings: Settings) -> list[Durable]:
    out = [
        Durable(
            INGEST_INBOX,
            INGEST_STREAM,
            "myelin.ingest.>",
            max_ack_pending=2000,
            ack_wait_s=settings.ingest_ack_wait_s,
            owner="ingest",
            shared=True,  # every ingest worker pulls from it
        ),
        Durable(
            RETRAINER_DURABLE,
            DRIFT_STREAM,
            "myelin.drift.>",
            max_ack_pending=64,
            ack_wait_s=RETRAINER_ACK_WAIT_S,
            owner="retrainer",
        ),
    ]
    for stream, name in WAREHOUSE_DRAINS.items():
        out.append(
            Durable(
                name,
                stream,
                ">",
                max_ack_pending=2 * warehouse_batch(stream, settings),
                ack_wait_s=WAREHOUSE_ACK_WAIT_S,
                owner="warehouse",
            )
        )
    return out


def durable(name: str, settings: Settings) -> Durable:
    for d in durables(settings):
        if d.name == name:
            return d
    raise KeyError(f"no durable consumer {name!r} in the topology")


def document(settings: Settings) -> dict[str, Any]:
    """The topology as Terraform reads it (``jsondecode(file(...))``)."""
    return {
        "_generated_by": "python -m myelin.topology (from myelin/topology.py); do not edit",
        "streams": {
            s.name: {
                "subjects": list(s.subjects),
                "duplicate_window_s": s.duplicate_window_s,
                "max_age_s": s.max_age_s,
            }
            for s in streams(settings)
        },
        "kv_buckets": {
            b.name: {"history": b.history, "ttl_s": b.ttl_s, "erasable": b.erasable}
            for b in buckets(settings)
        },
        "object_stores": list(OBJECT_STORES),
        "consumers": {
            d.name: {
                "stream": d.stream,
                "filter_subject": d.filter_subject,
                "max_ack_pending": d.max_ack_pending,
                "ack_wait_s": d.ack_wait_s,
                "ack_policy": "explicit" if d.shared else "all",
                "owner": d.owner,
            }
            for d in durables(settings)
        },
    }


def render(settings: Settings) -> str:
    return json.dumps(document(settings), indent=2, sort_keys=True) + "\n"


def main() -> None:
    """Write ``infra/terraform/topology.json`` from the defaults (or print it: ``-``)."""
    text = render(Settings())
    if sys.argv[1:] == ["-"]:
        sys.stdout.write(text)
    else:
        TERRAFORM_FILE.parent.mkdir(parents=True, exist_ok=True)
        TERRAFORM_FILE.write_text(text)
        print(f"wrote {TERRAFORM_FILE}")


if __name__ == "__main__":
    main()
