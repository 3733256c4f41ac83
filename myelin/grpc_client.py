"""A gRPC channel to the inference service, as a client of ``myelin up`` connects: over TLS
trusting the deployment's CA, with the client's bearer token on every call.

The CA is ``MYELIN_TLS_CA_FILE``, else the development CA ``myelin up`` wrote; the token
is ``MYELIN_API_TOKEN``, else the development token of ``identity`` (``app``). With
neither CA nor token (a server without TLS, as in the integration tests) the channel is
plaintext.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from myelin.api_tokens import client_token
from myelin.dev_tls import tls_dir
from myelin.settings import Settings


def ca_file(settings: Settings) -> Path | None:
    if settings.tls_ca_file:
        return Path(settings.tls_ca_file)
    dev = tls_dir(settings) / "ca.pem"
    return dev if dev.exists() else None


def credentials(settings: Settings, identity: str = "app") -> grpc.ChannelCredentials | None:
    """TLS trusting the CA, with the token as call credentials; ``None``: plaintext."""
    ca = ca_file(settings)
    if ca is None:
        return None
    creds = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    token = client_token(settings, identity)
    if token:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
    return creds


def channel(
    settings: Settings, target: str | None = None, *, identity: str = "app"
) -> grpc.aio.Channel:
    """``target``: ``host:port`` (default: this deployment's inference on loopback)."""
    target = target or f"127.0.0.1:{settings.inference_grpc_port}"
    creds = credentials(settings, identity)
    if creds is None:
        return grpc.aio.insecure_channel(target)
    return grpc.aio.secure_channel(target, creds)
