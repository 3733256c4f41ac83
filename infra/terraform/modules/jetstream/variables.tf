variable "topology_file" {
  description = "The platform's JetStream topology, written by `python -m myelin.topology` from myelin/topology.py (the same source the embedded stack provisions from)."
  type        = string
}

variable "replicas" {
  description = "Copies of every stream and bucket (3 on a three-node JetStream cluster)."
  type        = number
  default     = 3
  validation {
    condition     = contains([1, 3, 5], var.replicas)
    error_message = "JetStream replicas must be 1, 3 or 5."
  }
}

variable "max_bytes_per_stream" {
  description = "Cap on each stream's size in bytes (-1: unlimited); the oldest messages go first."
  type        = number
  default     = -1
}
