"""Event contracts: the envelope, the typed event payloads and their registry."""

from myelin.contracts.envelope import Envelope, IncomingEvent, StreamEvent
from myelin.contracts.registry import Contract, ContractRegistry, default_registry

__all__ = [
    "Contract",
    "ContractRegistry",
    "Envelope",
    "IncomingEvent",
    "StreamEvent",
    "default_registry",
]
