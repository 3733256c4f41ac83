"""Outbound adapters to a Rego evaluator: embedded regopy, or an OPA server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from myelin.errors import ConfigError, Retryable


class PolicyEngine(Protocol):
    version: str

    async def evaluate(self, package: str, input_doc: dict[str, Any]) -> Any: ...

    async def close(self) -> None: ...


def load_policies(policy_dir: Path) -> dict[str, str]:
    files = sorted(policy_dir.glob("*.rego"))
    if not files:
        raise ConfigError(f"no .rego files in {policy_dir}; set MYELIN_POLICY_DIR")
    return {f.name: f.read_text() for f in files}


class RegoEngine:
    """regopy, in process. Queries bind the package document, so a false rule is
    ``false`` rather than undefined (unlike a bare boolean query in regopy)."""

    def __init__(self, sources: dict[str, str], version: str) -> None:
        from regopy import Interpreter

        self.version = version
        self._rego = Interpreter()
        for name, text in sources.items():
            self._rego.add_module(name, text)

    async def evaluate(self, package: str, input_doc: dict[str, Any]) -> Any:
        self._rego.set_input(input_doc)
        out = self._rego.query(f"x := data.{package}")
        binding = out.binding("x")
        if binding is None:
            return None
        return json.loads(str(binding))

    async def close(self) -> None:
        return None


class OpaEngine:
    """An OPA server over its REST API (opa-python-client). Policies are pushed at start."""

    def __init__(self, url: str, sources: dict[str, str], version: str) -> None:
        from opa_client import AsyncOpaClient

        parsed = urlparse(url)
        if not parsed.hostname:
            raise ConfigError(f"MYELIN_OPA_URL must look like http://host:8181, got {url!r}")
        self.version = version
        self._sources = sources
        self._client = AsyncOpaClient(
            host=parsed.hostname,
            port=parsed.port or 8181,
            ssl=parsed.scheme == "https",
        )
        self._pushed = False

    async def _push(self) -> None:
        await self._client.__aenter__()
        for name, text in self._sources.items():
            await self._client.update_policy_from_string(text, f"myelin/{name}")
        self._pushed = True

    async def evaluate(self, package: str, input_doc: dict[str, Any]) -> Any:
        try:
            if not self._pushed:
                await self._push()
            resp = await self._client.query_rule(input_doc, package)
        except Exception as exc:  # noqa: BLE001 - any transport failure means "OPA unavailable"
            raise Retryable(f"OPA server did not answer: {exc}") from None
        return resp.get("result")

    async def close(self) -> None:
        if self._pushed:
            await self._client.close_connection()
