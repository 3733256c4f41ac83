"""Run by the e2e test in its own interpreter: a stock tritonclient user, nothing of Myelin
imported (tritonclient's generated protos would clash with ours in one process).

Usage: python triton_probe.py HOST:PORT MODEL INPUT.npy  -> JSON on stdout
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.grpc as triton


def main() -> None:
    url, model, path = sys.argv[1:4]
    x = np.load(path)
    client = triton.InferenceServerClient(url=url)
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    res = client.infer(
        model, [inp], outputs=[triton.InferRequestedOutput("probabilities")], request_id="triton-1"
    )
    out = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "meta": client.get_model_metadata(model, as_json=True),
        "server": client.get_server_metadata(as_json=True),
        "id": res.get_response().id,
        "probs": res.as_numpy("probabilities").tolist(),
    }
    try:
        client.get_model_metadata("no-such-model")
        out["missing"] = "found?!"
    except triton.InferenceServerException as exc:
        out["missing"] = exc.status()
    client.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
