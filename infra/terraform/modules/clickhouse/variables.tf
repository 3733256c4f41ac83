variable "namespace" {
  description = "The Kubernetes namespace of the platform."
  type        = string
}

variable "shards" {
  description = "ClickHouse shards."
  type        = number
  default     = 1
}

variable "replicas" {
  description = "Replicas of each shard (ReplicatedReplacingMergeTree keeps them equal)."
  type        = number
  default     = 2
}

variable "password_secret" {
  description = "An existing Secret with the ClickHouse admin password under key `admin-password`."
  type        = string
}

variable "chart_version" {
  description = "The bitnami/clickhouse chart, pinned."
  type        = string
  default     = "9.1.0"
}

variable "storage_size" {
  description = "Persistent volume per replica."
  type        = string
  default     = "200Gi"
}
