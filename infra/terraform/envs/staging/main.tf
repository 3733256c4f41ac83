# The staging environment: providers (credentials from the environment, never in files)
# and the platform module with this environment's sizes (terraform.tfvars).
terraform {
  required_version = ">= 1.6"
  required_providers {
    kubernetes = {
      source  = "hashicorp/kubernetes"
      version = "~> 2.31"
    }
    helm = {
      source  = "hashicorp/helm"
      version = "~> 2.14"
    }
    jetstream = {
      source  = "nats-io/jetstream"
      version = "~> 0.1"
    }
    archive = {
      source  = "hashicorp/archive"
      version = "~> 2.4"
    }
  }
  backend "s3" {
    key     = "myelin/staging/terraform.tfstate"
    encrypt = true
  }
}

variable "kube_context" {
  description = "The kubeconfig context of the staging cluster."
  type        = string
}

variable "nats_servers" {
  description = "JetStream servers, comma separated (the provider connects with NATS_CREDS from the environment)."
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

variable "sizes" {
  description = "This environment's shape."
  type        = any
}

provider "kubernetes" {
  config_context = var.kube_context
}

provider "helm" {
  kubernetes {
    config_context = var.kube_context
  }
}

provider "jetstream" {
  servers = var.nats_servers
}

module "platform" {
  source             = "../../modules/platform"
  environment        = "staging"
  namespace          = "myelin-staging"
  image              = var.image
  opa_image          = var.opa_image
  nats_url           = join(",", [for s in split(",", var.nats_servers) : "nats://${trimspace(s)}"])
  stream_replicas    = var.sizes.stream_replicas
  partitions         = var.sizes.partitions
  features_workers   = var.sizes.features_workers
  ingest_replicas    = var.sizes.ingest_replicas
  inference_replicas = var.sizes.inference_replicas
  redis              = var.sizes.redis
  clickhouse         = var.sizes.clickhouse
  prometheus_address = "http://prometheus-operated.monitoring.svc:9090"
}
