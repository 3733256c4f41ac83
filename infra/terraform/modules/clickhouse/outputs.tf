output "http_endpoint" {
  description = "The ClickHouse HTTP endpoint (credentials come from the Secret, not from here)."
  value       = "https://myelin-clickhouse.${var.namespace}.svc:8443"
}
