"""Myelin shared package: what every service and client shares.

Event contracts, subjects and streams, the bus helpers, settings, telemetry, the
online-store key layout, the warehouse interface, the embedded dev stack and the CLI.
Services import this package; they never import each other.
"""

__version__ = "0.1.0"
