# The root module: providers (credentials from the environment, never in files) and the
# platform. One environment per var file and state:
#   terraform init -backend-config=envs/staging.backend.hcl
#   terraform apply -var-file=envs/staging.tfvars
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
    encrypt = true # bucket and key: envs/<env>.backend.hcl
  }
}

variable "environment" {
  description = "dev, staging or prod (the platform module checks it)."
  type        = string
}

variable "kube_context" {
  description = "The kubeconfig context of the environment's cluster."
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
  description = "The environment's shape: stream replicas, partitions, worker and pod bounds, Redis and ClickHouse."
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
  source             = "./modules/platform"
  environment        = var.environment
  namespace          = "myelin-${var.environment}"
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

output "namespace" {
  description = "Where the platform runs."
  value       = module.platform.namespace
}
