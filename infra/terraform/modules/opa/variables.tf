variable "namespace" {
  description = "The Kubernetes namespace of the platform."
  type        = string
}

variable "policy_dir" {
  description = "The Rego policies governance evaluates (myelin/policies), packed into an OPA bundle."
  type        = string
}

variable "image" {
  description = "The OPA image, pinned by digest."
  type        = string
  validation {
    condition     = can(regex("@sha256:[0-9a-f]{64}$", var.image))
    error_message = "Pin the OPA image by digest."
  }
}

variable "replicas" {
  description = "OPA pods (stateless: the bundle is in each)."
  type        = number
  default     = 2
}
