output "url" {
  description = "MYELIN_REDIS_URL (with MYELIN_REDIS_CLUSTER=1); the password comes from the Secret."
  value       = "rediss://myelin-redis-redis-cluster.${var.namespace}.svc:6379/0"
}
