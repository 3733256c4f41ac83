"""features: event stream -> windowed per-entity features.

Online values and window states go to Redis; offline values (one row per applied event)
to the FEATURES stream, which the warehouse service drains into ClickHouse. Feature view
versions run side by side and are promoted through governance.
"""
