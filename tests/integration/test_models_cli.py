"""`myelin models` against real engines (nats-server, regopy governance, inference): register
from an ONNX file and META.json with a training set, list, show, alias, route, rollback;
typed errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from nats.aio.client import Client as NATS

from myelin import bus, models_cli
from myelin.cli import build_parser
from myelin.drift import build_reference
from myelin.errors import MyelinError
from myelin.models import ModelRegistry, PromotionDenied, Routes
from myelin.settings import Settings
from services.inference.app import InferenceApp
from tests.helpers import FEATURES, tiny_model

pytestmark = pytest.mark.integration
ROWS = 400


async def _run(settings: Settings, *argv: str) -> int:
    return await models_cli.run(build_parser().parse_args(["models", *argv]), settings)


def _training_matrix() -> npt.NDArray[np.float32]:
    x = np.zeros((ROWS, len(FEATURES)), np.float32)
    x[:] = (np.arange(ROWS) % 7)[:, None]
    return x


def _files(tmp: Path, seed: int) -> tuple[str, str, str]:
    """MODEL.onnx, META.json and a training set (Parquet) of a small trained model."""
    t = tiny_model(seed)
    model = tmp / f"m{seed}.onnx"
    meta = tmp / f"m{seed}.json"
    training = tmp / f"t{seed}.parquet"
    model.write_bytes(t.onnx)
    doc = {
        "name": "ctr",
        "provenance": {
            "training_window": list(t.window),
            "feature_views": ["user_activity@x"],
            "feature_view": "user_activity",
            "features": FEATURES,
            "training_rows": t.train_rows,
            "label_source": {"kind": "event", "event_type": "click", "window_s": 60},
        },
        "metrics": t.metrics,
    }
    meta.write_text(json.dumps(doc))
    x = _training_matrix()
    pq.write_table(
        pa.table({f: x[:, j].astype(np.float64) for j, f in enumerate(FEATURES)}), training
    )
    return str(model), str(meta), str(training)


def _edit(path: Path, changes: dict[str, object]) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


async def test_register_route_and_rollback_from_the_command_line(
    serving: tuple[Settings, InferenceApp],
    nc: NATS,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    s, _ = serving
    m1, meta1, train1 = _files(tmp_path, 0)
    m2, meta2, _ = _files(tmp_path, 7)
    assert await _run(s, "register", m1, "--meta", meta1, "--training", train1) == 0
    assert "registered ctr v1" in capsys.readouterr().out
    assert await _run(s, "register", m2, "--meta", meta2) == 0
    reg = ModelRegistry(nc, bus.jetstream(nc, s))
    v1, v2 = await reg.get("ctr", 1), await reg.get("ctr", 2)
    assert [i.name for i in v1.inputs] == ["input"] and v1.inputs[0].shape == [-1, len(FEATURES)]
    # the drift reference is the training set as the model itself scores it
    x = _training_matrix()
    sess = ort.InferenceSession(tiny_model(0).onnx, providers=["CPUExecutionProvider"])
    assert v1.reference == build_reference(FEATURES, x, sess.run(None, {"input": x})[1][:, 1])
    assert v2.reference is None

    assert await _run(s, "alias", "ctr", "champion", "1", "--requester", "ops") == 0
    assert await _run(s, "route", "ctr", "--shadow", "2", "--requester", "ops") == 0
    assert "shadow v2" in capsys.readouterr().out
    with pytest.raises(PromotionDenied, match="at most 50%"):
        await _run(s, "route", "ctr", "--canary", "2", "--share", "0.8", "--requester", "ops")
    assert await reg.routes("ctr") == Routes(shadow=2)  # the refused move changed nothing
    assert await _run(s, "list", "ctr") == 0
    out = capsys.readouterr().out
    assert "ctr v1 champion" in out and "ctr v2 shadow" in out and "drift=yes" in out
    assert await _run(s, "show", "ctr@champion") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == 1 and shown["reference"]["rows"] == ROWS
    assert await _run(s, "route", "ctr", "--rollback", "--requester", "ops") == 0
    assert "routes cleared" in capsys.readouterr().out
    assert await reg.routes("ctr") == Routes()


@pytest.mark.parametrize(
    ("meta", "problem"),
    [
        ({"nme": "ctr"}, "unknown field"),
        ({"metrics": {"auc": "high"}}, "Expected `float`"),
        ({"name": "Bad Name"}, "must match"),
    ],
)
async def test_bad_metadata_is_refused_with_the_reason(
    serving: tuple[Settings, InferenceApp],
    tmp_path: Path,
    meta: dict[str, object],
    problem: str,
) -> None:
    s, _ = serving
    model, meta_path, _ = _files(tmp_path, 0)
    _edit(Path(meta_path), meta)
    with pytest.raises(MyelinError, match=problem):
        await _run(s, "register", model, "--meta", meta_path)


async def test_a_file_that_is_not_a_model_or_a_training_set_without_its_features_is_refused(
    serving: tuple[Settings, InferenceApp], tmp_path: Path
) -> None:
    s, _ = serving
    model, meta_path, training = _files(tmp_path, 0)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\xffnot onnx")
    with pytest.raises(MyelinError, match="not a model onnxruntime can load"):
        await _run(s, "register", str(junk), "--meta", meta_path)
    pq.write_table(pa.table({"other": [1.0]}), training)
    with pytest.raises(MyelinError, match="lacks the model's feature"):
        await _run(s, "register", model, "--meta", meta_path, "--training", training)
    with pytest.raises(MyelinError, match="cannot read"):
        await _run(s, "register", str(tmp_path / "absent.onnx"), "--meta", meta_path)
