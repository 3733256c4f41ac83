"""Inbound adapter: grpc.aio servicers for OIP v2 (``inference.GRPCInferenceService``) and
Myelin's feature-aware ``myelin.predict.v1.Predictor``. Errors map to status codes;
trace context is read from the ``traceparent`` metadata entry."""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2_grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from myelin import __version__, slis, telemetry
from myelin.errors import MyelinError, Overloaded, Retryable
from myelin.gen import grpc_predict_v2_pb2 as oip
from myelin.gen import grpc_predict_v2_pb2_grpc as oip_grpc
from myelin.gen import myelin_predict_pb2 as mp
from myelin.gen import myelin_predict_pb2_grpc as mp_grpc
from myelin.models import ModelNotFound, RegistryError
from myelin.online import UnknownView
from services.inference.logic import TensorError, decode_input, encode_output
from services.inference.model_host import ModelDenied
from services.inference.predict_batch import FeaturesUnavailable
from services.inference.predictor import NotFeatureAware, Predictor
from services.inference.readiness import Readiness

log = logging.getLogger(__name__)

_CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (ModelNotFound, grpc.StatusCode.NOT_FOUND),
    (TensorError, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelDenied, grpc.StatusCode.FAILED_PRECONDITION),
    (NotFeatureAware, grpc.StatusCode.FAILED_PRECONDITION),
    (FeaturesUnavailable, grpc.StatusCode.FAILED_PRECONDITION),
    (UnknownView, grpc.StatusCode.FAILED_PRECONDITION),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Retryable, grpc.StatusCode.UNAVAILABLE),
    (RegistryError, grpc.StatusCode.INTERNAL),
]


# The caller's fault: recorded as outcome "rejected" in the latency SLI, not "error".
_CLIENT_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.ALREADY_EXISTS,
    }
)
_SLI: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("sli", default=None)


@contextlib.contextmanager
def _boundary(context: grpc.aio.ServicerContext[Any, Any], method: str) -> Iterator[None]:
    md = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
    with (
        slis.timed(method) as sli,
        telemetry.tracer("myelin.inference").start_as_current_span(
            method, context=telemetry.extract(md), kind=SpanKind.SERVER
        ),
    ):
        token = _SLI.set(sli)
        try:
            yield
        finally:
            _SLI.reset(token)


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> None:
    for cls, code in _CODES:
        if isinstance(exc, cls):
            msg = exc.message if isinstance(exc, MyelinError) else str(exc)
            sli = _SLI.get()
            if sli is not None and code in _CLIENT_CODES:
                sli["outcome"] = "rejected"
            await context.abort(code, msg)
    log.exception("unexpected error", exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")


class OipServicer(oip_grpc.GRPCInferenceServiceServicer):
    def __init__(self, predictor: Predictor, readiness: Readiness) -> None:
        self.p = predictor
        self.readiness = readiness

    async def ServerLive(
        self, request: oip.ServerLiveRequest, context: Any
    ) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: oip.ServerReadyRequest, context: Any
    ) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=await self.readiness.published_ready())

    async def ServerMetadata(
        self, request: oip.ServerMetadataRequest, context: Any
    ) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(name="myelin", version=__version__, extensions=[])

    async def ModelReady(
        self, request: oip.ModelReadyRequest, context: Any
    ) -> oip.ModelReadyResponse:
        return oip.ModelReadyResponse(ready=self.p.host.model_ready(request.name, request.version))

    async def ModelMetadata(
        self, request: oip.ModelMetadataRequest, context: Any
    ) -> oip.ModelMetadataResponse:
        with _boundary(context, "ModelMetadata"):
            try:
                model, _ = await self.p.host.get(request.name, request.version)
                versions = await self.p.host.versions(request.name)
            except Exception as exc:
                await _abort(context, exc)
                raise
            return oip.ModelMetadataResponse(
                name=request.name,
                versions=[str(v) for v in versions],
                platform=model.mv.platform,
                inputs=[
                    oip.ModelMetadataResponse.TensorMetadata(
                        name=t.name, datatype=t.datatype, shape=t.shape
                    )
                    for t in model.ort.inputs
                ],
                outputs=[
                    oip.ModelMetadataResponse.TensorMetadata(
                        name=t.name, datatype=t.datatype, shape=t.shape
                    )
                    for t in model.ort.outputs
                ],
            )

    async def ModelInfer(
        self, request: oip.ModelInferRequest, context: Any
    ) -> oip.ModelInferResponse:
        with _boundary(context, "ModelInfer"):
            try:
                model, _ = await self.p.host.get(request.model_name, request.model_version)
                expected = {t.name: t.datatype for t in model.ort.inputs}
                raw = list(request.raw_input_contents)
                if raw and len(raw) != len(request.inputs):
                    raise TensorError(
                        f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs"
                    )
                feeds = {
                    t.name: decode_input(t, raw[i] if raw else None, expected.get(t.name))
                    for i, t in enumerate(request.inputs)
                }
                names = [o.name for o in request.outputs] or None
                model, results = await self.p.infer(
                    request.model_name, str(model.mv.version), feeds, names, request.id
                )
                resp = oip.ModelInferResponse(
                    model_name=request.model_name, model_version=model.version, id=request.id
                )
                for name, value in results:
                    tensor, blob = encode_output(name, value, raw=bool(raw))
                    resp.outputs.append(tensor)
                    if blob is not None:
                        resp.raw_output_contents.append(blob)
                return resp
            except Exception as exc:
                await _abort(context, exc)
                raise


PREDICT_LINKS = 16  # links from a Predict span to the traces of its features' events


class PredictorServicer(mp_grpc.PredictorServicer):
    def __init__(self, predictor: Predictor) -> None:
        self.p = predictor

    async def Predict(self, request: mp.PredictRequest, context: Any) -> mp.PredictResponse:
        with _boundary(context, "Predict"):
            try:
                r = await self.p.predict(
                    request.model_name,
                    request.model_version,
                    list(request.entity_ids),
                    request.request_id,
                )
            except Exception as exc:
                await _abort(context, exc)
                raise
            # the traces of the events behind the features used (a few: a link each)
            telemetry.link_traces(
                trace.get_current_span(), (v.trace_id for v in r.vectors), PREDICT_LINKS
            )
            prov = r.model.mv.provenance
            view_hash = r.vectors[0].version if r.vectors else ""  # the version actually read
            return mp.PredictResponse(
                model_name=request.model_name,
                model_version=r.model.version,
                alias=r.alias,
                request_id=r.request_id,
                feature_view=prov.feature_view,
                feature_view_hash=view_hash,
                trace_id=r.trace_id,
                predictions=[
                    mp.Prediction(
                        entity_id=v.entity_id,
                        score=s,
                        features=[
                            mp.FeatureValue(name=n, value=x)
                            for n, x in zip(r.feature_names, v.values, strict=True)
                        ],
                        feature_age_ms=v.age_ms,
                        feature_status=v.status.value,
                    )
                    for v, s in zip(r.vectors, r.scores, strict=True)
                ],
            )


def build_server(
    predictor: Predictor,
    readiness: Readiness,
    host: str,
    port: int,
    *,
    tls: tuple[bytes, bytes] | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> tuple[grpc.aio.Server, int]:
    """``tls``: (private key, certificate chain) in PEM, or ``None`` for plaintext."""
    server = grpc.aio.server(
        interceptors=list(interceptors),
        options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ],
    )
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(OipServicer(predictor, readiness), server)
    health_pb2_grpc.add_HealthServicer_to_server(readiness.health, server)
    mp_grpc.add_PredictorServicer_to_server(PredictorServicer(predictor), server)
    if tls is None:
        bound = server.add_insecure_port(f"{host}:{port}")
    else:
        bound = server.add_secure_port(f"{host}:{port}", grpc.ssl_server_credentials([tls]))
    return server, bound
