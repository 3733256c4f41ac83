variable "environment" {
  description = "dev, staging or prod."
  type        = string
  validation {
    condition     = contains(["dev", "staging", "prod"], var.environment)
    error_message = "environment is dev, staging or prod."
  }
}

variable "namespace" {
  description = "The Kubernetes namespace for the platform."
  type        = string
}

variable "image" {
  description = "The Myelin image, pinned by digest."
  type        = string
}

variable "opa_image" {
  description = "The OPA image, pinned by digest."
  type        = string
}

variable "nats_url" {
  description = "MYELIN_NATS_URL: the JetStream cluster's client URLs."
  type        = string
}

variable "stream_replicas" {
  description = "Copies of every stream and bucket."
  type        = number
  default     = 3
}

variable "partitions" {
  description = "MYELIN_PARTITIONS: event partitions (the features workers share them)."
  type        = number
  default     = 8
}

variable "features_workers" {
  description = "Bounds of the features workers (KEDA scales between them on consumer lag)."
  type        = object({ min = number, max = number })
  default     = { min = 1, max = 4 }
}

variable "ingest_replicas" {
  description = "Bounds of the ingest pods (HPA on CPU and p99 latency)."
  type        = object({ min = number, max = number })
  default     = { min = 2, max = 8 }
}

variable "inference_replicas" {
  description = "Bounds of the inference pods (HPA on CPU and Predict p99)."
  type        = object({ min = number, max = number })
  default     = { min = 2, max = 8 }
}

variable "prometheus_address" {
  description = "Prometheus, for KEDA's lag trigger."
  type        = string
}

variable "redis" {
  description = "Redis Cluster shape."
  type        = object({ shards = number, replicas_per_shard = number })
  default     = { shards = 3, replicas_per_shard = 1 }
}

variable "clickhouse" {
  description = "ClickHouse shape."
  type        = object({ shards = number, replicas = number, storage_size = string })
  default     = { shards = 1, replicas = 2, storage_size = "200Gi" }
}
