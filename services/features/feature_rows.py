"""Outbound adapter: offline feature values to the FEATURES stream (the warehouse drains
it into ClickHouse ``feature_values``).

A batch's rows go out in chunks (a NATS message is capped at 1 MB) with ids derived from
the batch's sequences, so a redelivered batch is deduplicated by JetStream, and a batch cut
differently after a restart produces rows that collapse in ReplacingMergeTree.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import msgspec

from myelin.bus import OutMsg, Publisher, raise_unless_stored
from myelin.records import FeatureRow, FeatureRows
from myelin.subjects import feature_subject
from services.features.views import FeatureView

CHUNK_ROWS = 2000  # ~250 KB per message for a 13-feature view
_mp = msgspec.msgpack.Encoder()

RowsSink = Callable[[FeatureView, list[FeatureRow], int, int], Awaitable[None]]


def rows_publisher(pub: Publisher, id_prefix: str = "fv") -> RowsSink:
    """``id_prefix`` keeps a replay's messages apart from the live ones in JetStream's
    duplicate window (a rebuild must reach the warehouse even minutes after the original)."""

    async def publish(view: FeatureView, rows: list[FeatureRow], first: int, last: int) -> None:
        names = list(view.feature_names)
        version = view.content_hash
        msgs = [
            OutMsg(
                feature_subject(view.name, version),
                _mp.encode(
                    FeatureRows(
                        view=view.name,
                        version=version,
                        features=names,
                        rows=rows[k : k + CHUNK_ROWS],
                    )
                ),
                f"{id_prefix}:{version}:{first}-{last}:{k // CHUNK_ROWS}",
            )
            for k in range(0, len(rows), CHUNK_ROWS)
        ]
        # a batch whose rows are not stored is retried; a refusal stops the view
        raise_unless_stored(await pub.publish_batch(msgs), "FEATURES stream")

    return publish
