variable "namespace" {
  description = "The Kubernetes namespace of the platform."
  type        = string
}

variable "shards" {
  description = "Redis Cluster masters (the online store's partitions spread over their slots)."
  type        = number
  default     = 3
}

variable "replicas_per_shard" {
  description = "Replicas of each master (0 in dev)."
  type        = number
  default     = 1
}

variable "password_secret" {
  description = "An existing Secret with the Redis password under key `redis-password` (never in Terraform state)."
  type        = string
}

variable "chart_version" {
  description = "The bitnami/redis-cluster chart, pinned."
  type        = string
  default     = "11.0.6"
}

variable "memory_limit" {
  description = "Memory limit of each Redis node (maxmemory follows it; eviction is off: the online store must not lose keys)."
  type        = string
  default     = "4Gi"
}
