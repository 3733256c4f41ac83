variable "name" {
  description = "The Myelin service: governance, warehouse, features, inference, ingest, retrainer or ops."
  type        = string
  validation {
    condition     = contains(["governance", "warehouse", "features", "inference", "ingest", "retrainer", "ops"], var.name)
    error_message = "Not a Myelin service."
  }
}

variable "namespace" {
  description = "The Kubernetes namespace of the platform."
  type        = string
}

variable "image" {
  description = "The Myelin image, pinned by digest (registry/myelin@sha256:...)."
  type        = string
  validation {
    condition     = can(regex("@sha256:[0-9a-f]{64}$", var.image))
    error_message = "Pin the image by digest (…@sha256:<64 hex>), not by tag."
  }
}

variable "replicas" {
  description = "Pods at start (the autoscaler moves it between min and max)."
  type        = number
  default     = 1
}

variable "autoscale" {
  description = "HPA bounds and targets: CPU utilization (percent) and, for request services, the p99 latency in seconds (a Pods metric served by prometheus-adapter from myelin_rpc_duration_seconds)."
  type = object({
    min_replicas      = number
    max_replicas      = number
    cpu_percent       = number
    p99_latency_s     = optional(number)
    p99_latency_label = optional(string)
  })
  default = null
}

variable "lag_scaler" {
  description = "KEDA ScaledObject on consumer lag (the features workers): Prometheus address, the PromQL lag query, and messages of lag per worker."
  type = object({
    prometheus_address = string
    query              = string
    threshold          = number
    min_replicas       = number
    max_replicas       = number
  })
  default = null
}

variable "env" {
  description = "MYELIN_* settings (non-secret)."
  type        = map(string)
  default     = {}
}

variable "secret_env" {
  description = "MYELIN_* settings read from a Kubernetes Secret: env name -> key in var.secret_name."
  type        = map(string)
  default     = {}
}

variable "secret_name" {
  description = "The Secret holding the values of var.secret_env (created outside Terraform state)."
  type        = string
  default     = "myelin-secrets"
}

variable "ports" {
  description = "Ports the service serves (name -> port), besides the probe port."
  type        = map(number)
  default     = {}
}

variable "grpc_probe_port" {
  description = "Probe readiness with the gRPC health protocol on this port (inference), instead of HTTP /readyz."
  type        = number
  default     = null
}

variable "resources" {
  description = "Requests and limits of the container."
  type = object({
    cpu_request    = string
    cpu_limit      = string
    memory_request = string
    memory_limit   = string
  })
  default = {
    cpu_request    = "500m"
    cpu_limit      = "2"
    memory_request = "512Mi"
    memory_limit   = "2Gi"
  }
}
