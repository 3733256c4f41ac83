"""Predict traffic for the fault harness, in its own process: gRPC's threads must not live
in the process that forks the stack's children (a child forked beside them can crash
before it runs anything).

    python -m faults.predict_load HOST:PORT USER [USER ...]

Sends ~20 single-entity Predict requests a second until SIGTERM, then prints
``{"ok": N, "failed": M}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import sys

import grpc

from myelin import grpc_client
from myelin.gen import myelin_predict_pb2 as mp
from myelin.gen import myelin_predict_pb2_grpc as mp_grpc
from myelin.settings import Settings


async def run(target: str, users: list[str]) -> dict[str, int]:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    counts = {"ok": 0, "failed": 0}
    rng = random.Random(7)
    # MYELIN_STATE_DIR: the stack's, for its CA and the application token
    async with grpc_client.channel(Settings.from_env(), target) as ch:
        stub = mp_grpc.PredictorStub(ch)
        k = 0
        while not stop.is_set():
            k += 1
            req = mp.PredictRequest(
                model_name="ctr", entity_ids=[rng.choice(users)], request_id=f"faults-{k}"
            )
            try:
                await stub.Predict(req, timeout=2)
                counts["ok"] += 1
            except grpc.aio.AioRpcError:
                counts["failed"] += 1  # inference restarting: expected under faults
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)
    return counts


if __name__ == "__main__":
    print(json.dumps(asyncio.run(run(sys.argv[1], sys.argv[2:]))), flush=True)
