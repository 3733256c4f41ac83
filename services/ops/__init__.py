"""ops: the live ops page (throughput, lag, freshness, latency, DLQ and late rates, drift,
governance), served over HTTP from every service's health and the warehouse."""
