"""The embedded dev stack: real nats-server and redis-server plus the four services."""
