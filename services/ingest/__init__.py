"""ingest: enforces event contracts and publishes accepted events to JetStream."""
