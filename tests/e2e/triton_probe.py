"""Run by the e2e test in its own interpreter: a stock tritonclient user, nothing of Myelin
imported (tritonclient's generated protos would clash with ours in one process).

Usage: python triton_probe.py HOST:PORT MODEL INPUT.npy  -> JSON on stdout
With TRITON_CA (a CA file) and TRITON_TOKEN set it connects over TLS and sends the token
in the ``authorization`` header, as a Triton user does against a secured server.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import tritonclient.grpc as triton


def main() -> None:
    url, model, path = sys.argv[1:4]
    x = np.load(path)
    ca, token = os.environ.get("TRITON_CA"), os.environ.get("TRITON_TOKEN")
    client = triton.InferenceServerClient(url=url, ssl=bool(ca), root_certificates=ca)
    h = {"authorization": f"Bearer {token}"} if token else None
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    res = client.infer(
        model,
        [inp],
        outputs=[triton.InferRequestedOutput("probabilities")],
        request_id="triton-1",
        headers=h,
    )
    out = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model, headers=h),
        "meta": client.get_model_metadata(model, as_json=True, headers=h),
        "server": client.get_server_metadata(as_json=True, headers=h),
        "id": res.get_response().id,
        "probs": res.as_numpy("probabilities").tolist(),
    }
    try:
        client.get_model_metadata("no-such-model", headers=h)
        out["missing"] = "found?!"
    except triton.InferenceServerException as exc:
        out["missing"] = exc.status()
    client.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
