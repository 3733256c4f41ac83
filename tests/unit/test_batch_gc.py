"""The features service's garbage-collection pacing (pure CPython behaviour, no engines)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from myelin.service import BatchGc

# These tests run full collections: an earlier test's unreachable leftovers (a closed
# loop's transports) are finalized here and would be reported against this module.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture
def restore_gc() -> Iterator[None]:
    yield
    gc.unfreeze()


def test_after_a_batch_live_objects_are_out_of_collection(restore_gc: None) -> None:
    before = gc.get_freeze_count()
    kept = [[i] for i in range(10_000)]  # a batch's long-lived objects
    BatchGc(full_every_s=0).after_batch()
    assert gc.get_freeze_count() >= before + len(kept)
    assert gc.get_count()[0] < 100  # the young generation starts empty again


def test_the_periodic_full_collection_reclaims_cycles(restore_gc: None) -> None:
    class Node:
        def __init__(self) -> None:
            self.me = self

    pacer = BatchGc(full_every_s=0)
    cycle = Node()
    alive = weakref.ref(cycle)
    pacer.after_batch()  # frozen while still referenced ...
    del cycle  # ... so no collection would ever see it
    gc.collect()
    assert alive() is not None
    full = BatchGc(full_every_s=1e-9)
    full.after_batch()
    assert full.full_collections == 1
    assert alive() is None
