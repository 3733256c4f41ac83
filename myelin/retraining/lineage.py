"""What a retrained version records of where it came from: the SHA-256 of its training
set in a canonical form (:func:`fingerprint`; the same bound gives the same rows, so the
same fingerprint) and the code that ran (:func:`code_version`)."""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

TRAINING_LABELS = "training_labels"  # the champion's label naming its labels builder
FINGERPRINT_FORMAT = "myelin-training-set/1"


def fingerprint(table: pa.Table, features: list[str]) -> str:
    """SHA-256 of a training set in a canonical form (``myelin-training-set/1``): the
    column names, the row count, then per column its null mask and its values as
    little-endian fixed-width numbers (times as int64 microseconds since the epoch,
    labels as int64, features as float64 with one NaN) or, for the entity ids, int64
    UTF-8 lengths then the bytes. Independent of the Arrow types and chunking ClickHouse
    (embedded or server) returns: the same rows give the same fingerprint."""
    cols = ["entity_id", "ts", "label", "features_as_of", *features]
    h = hashlib.sha256(FINGERPRINT_FORMAT.encode())
    h.update(json.dumps(cols).encode())
    h.update(np.int64(table.num_rows).astype("<i8").tobytes())
    for name in cols:
        col = table.column(name).combine_chunks()
        nulls = pc.is_null(col).to_numpy(zero_copy_only=False).astype(np.uint8)
        h.update(nulls.tobytes())
        if name == "entity_id":
            values = [v or "" for v in col.cast(pa.string()).to_pylist()]
            encoded = [v.encode() for v in values]
            h.update(np.fromiter(map(len, encoded), np.int64, len(encoded)).astype("<i8").tobytes())
            h.update(b"".join(encoded))
        elif name in ("ts", "features_as_of"):
            us = col.cast(pa.timestamp("us", tz="UTC"), safe=False).cast(pa.int64()).fill_null(0)
            h.update(us.to_numpy(zero_copy_only=False).astype("<i8").tobytes())
        elif name == "label":
            labels = col.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
            h.update(labels.astype("<i8").tobytes())
        else:
            v = col.cast(pa.float64()).fill_null(0.0).to_numpy(zero_copy_only=False)
            v = np.where(np.isnan(v), np.float64("nan"), v).astype("<f8")
            h.update(v.tobytes())
    return h.hexdigest()


def _git_commit(root: Path) -> str:
    """The commit checked out in ``root`` (the source tree this package runs from; '' when
    it is not a git checkout). Read from the files (HEAD, refs, packed-refs): no git
    process is run."""
    dot = root / ".git"
    if dot.is_file():  # a worktree: "gitdir: <path>"
        text = dot.read_text().strip()
        if not text.startswith("gitdir:"):
            return ""
        dot = (root / text.split(":", 1)[1].strip()).resolve()
    if not (dot / "HEAD").is_file():
        return ""
    head = (dot / "HEAD").read_text().strip()
    if not head.startswith("ref:"):
        return head  # detached
    ref = head.split(":", 1)[1].strip()
    common = dot
    if (dot / "commondir").is_file():
        common = (dot / (dot / "commondir").read_text().strip()).resolve()
    for base in (dot, common):
        if (base / ref).is_file():
            return (base / ref).read_text().strip()
    packed = common / "packed-refs"
    if packed.is_file():
        for line in packed.read_text().splitlines():
            sha, _, name = line.partition(" ")
            if name == ref:
                return sha
    return ""


def code_version() -> dict[str, str]:
    """What code builds a training set and registers a version: the package version, the
    git commit (when run from a checkout) and the SHA-256 of the source of the training-set
    module and of this package's modules, in name order (the commit alone misses
    uncommitted changes)."""
    try:
        version = metadata.version("myelin")
    except metadata.PackageNotFoundError:
        version = "unknown"
    retraining = Path(__file__).resolve().parent
    package = retraining.parent  # myelin/
    h = hashlib.sha256()
    for path in (package / "training.py", *sorted(retraining.glob("*.py"))):
        h.update(path.read_bytes())
    return {
        "myelin_version": version,
        "git_commit": _git_commit(package.parent),
        "training_code_sha256": h.hexdigest(),
    }
