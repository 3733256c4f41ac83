"""Test helpers that build real artifacts (no mocks): ONNX models, registered versions."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from nats.aio.client import Client as NATS

from myelin import bus
from myelin.demo.trainer import Trained, train
from myelin.models import ModelRegistry, Provenance
from myelin.settings import Settings
from services.features.views import USER_ACTIVITY

FEATURES = list(USER_ACTIVITY.feature_names)


def tiny_model(seed: int = 0, rows: int = 2000) -> Trained:
    rng = np.random.default_rng(seed)
    cols = {f: rng.poisson(3, rows).astype(np.float64) for f in FEATURES}
    logit = 0.8 * cols["clicks_1h"] - 0.3 * cols["impressions_1h"] + rng.normal(0, 1, rows)
    table = pa.table(
        {
            **cols,
            "label": (logit > 0).astype(np.int64),
            "ts": pa.array(np.arange(rows) * 1000, pa.timestamp("ms")),
        }
    )
    return train(table, FEATURES)


async def register(
    nc: NATS,
    settings: Settings,
    t: Trained,
    *,
    alias: str | None = "champion",
    labels: dict[str, str] | None = None,
    provenance: bool = True,
) -> int:
    reg = ModelRegistry(nc, bus.jetstream(nc, settings))
    prov = (
        Provenance(
            training_window=list(t.window),
            feature_views=[f"user_activity@{USER_ACTIVITY.content_hash}"],
            feature_view="user_activity",
            features=t.features,
            training_rows=t.train_rows,
        )
        if provenance
        else Provenance()
    )
    mv = await reg.register(
        "ctr",
        t.onnx,
        inputs=t.inputs,
        outputs=t.outputs,
        provenance=prov,
        metrics=t.metrics,
        labels=labels,
    )
    if alias:
        await reg.set_alias("ctr", alias, mv.version, requester="test")
    return mv.version
