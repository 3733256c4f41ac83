# The whole platform in one namespace: JetStream topology, Redis Cluster, ClickHouse, the
# OPA policy bundle, and the seven Myelin services with probes and autoscaling.
locals {
  repo_root = "${path.module}/../../../.."
  secrets   = "myelin-secrets" # created by the operator (kubectl / external-secrets), never in state
  common_env = {
    MYELIN_NATS_URL       = var.nats_url
    MYELIN_REDIS_CLUSTER  = "1"
    MYELIN_REDIS_URL      = module.redis.url
    MYELIN_OPA_URL        = module.opa.url
    MYELIN_PARTITIONS     = tostring(var.partitions)
    MYELIN_STREAM_REPLICAS = tostring(var.stream_replicas)
    MYELIN_STATE_DIR      = "/var/lib/myelin"
    MYELIN_METRICS_PORT   = "9464"
  }
  secret_env = {
    MYELIN_CLICKHOUSE_URL = "clickhouse-url" # https://user:password@host:8443/myelin
  }
  lag_query = "sum(myelin_consumer_lag_messages{namespace=\"${var.namespace}\",durable=~\"features-.*\"})"
}

resource "kubernetes_namespace_v1" "myelin" {
  metadata {
    name = var.namespace
    labels = {
      "app.kubernetes.io/part-of"          = "myelin"
      "myelin/environment"                 = var.environment
      "pod-security.kubernetes.io/enforce" = "restricted"
    }
  }
}

# Only the platform's own pods talk to each other; ingest, inference, the warehouse's SQL
# port and the ops page are reached through the ingress controller's namespace.
resource "kubernetes_network_policy_v1" "default_deny" {
  metadata {
    name      = "myelin-default-deny"
    namespace = kubernetes_namespace_v1.myelin.metadata[0].name
  }
  spec {
    pod_selector {}
    policy_types = ["Ingress"]
    ingress {
      from {
        pod_selector {
          match_labels = { "app.kubernetes.io/part-of" = "myelin" }
        }
      }
      from {
        namespace_selector {
          match_labels = { "kubernetes.io/metadata.name" = "ingress-nginx" }
        }
      }
      from {
        namespace_selector {
          match_labels = { "kubernetes.io/metadata.name" = "monitoring" }
        }
      }
    }
  }
}

module "jetstream" {
  source        = "../jetstream"
  topology_file = "${path.module}/../../topology.json"
  replicas      = var.stream_replicas
}

module "redis" {
  source             = "../redis"
  namespace          = kubernetes_namespace_v1.myelin.metadata[0].name
  shards             = var.redis.shards
  replicas_per_shard = var.redis.replicas_per_shard
  password_secret    = local.secrets
}

module "clickhouse" {
  source          = "../clickhouse"
  namespace       = kubernetes_namespace_v1.myelin.metadata[0].name
  shards          = var.clickhouse.shards
  replicas        = var.clickhouse.replicas
  storage_size    = var.clickhouse.storage_size
  password_secret = local.secrets
}

module "opa" {
  source     = "../opa"
  namespace  = kubernetes_namespace_v1.myelin.metadata[0].name
  policy_dir = "${local.repo_root}/myelin/policies"
  image      = var.opa_image
}

module "governance" {
  source    = "../service"
  name      = "governance"
  namespace = kubernetes_namespace_v1.myelin.metadata[0].name
  image     = var.image
  replicas  = 2
  env       = local.common_env
}

module "warehouse" {
  source     = "../service"
  name       = "warehouse"
  namespace  = kubernetes_namespace_v1.myelin.metadata[0].name
  image      = var.image
  env        = merge(local.common_env, { MYELIN_WAREHOUSE_HTTP_PORT = "8123" })
  secret_env = local.secret_env
  ports      = { sql = 8123 }
}

module "features" {
  source     = "../service"
  name       = "features"
  namespace  = kubernetes_namespace_v1.myelin.metadata[0].name
  image      = var.image
  replicas   = var.features_workers.min
  # more than one worker: partitions are shared by leases (each pod is a worker)
  env        = merge(local.common_env, { MYELIN_FEATURES_WORKERS = tostring(var.features_workers.max) })
  resources = {
    cpu_request    = "1"
    cpu_limit      = "2"
    memory_request = "1Gi"
    memory_limit   = "4Gi"
  }
  lag_scaler = {
    prometheus_address = var.prometheus_address
    query              = local.lag_query
    threshold          = 20000 # messages of lag per worker before another starts
    min_replicas       = var.features_workers.min
    max_replicas       = var.features_workers.max
  }
}

module "inference" {
  source          = "../service"
  name            = "inference"
  namespace       = kubernetes_namespace_v1.myelin.metadata[0].name
  image           = var.image
  replicas        = var.inference_replicas.min
  env             = merge(local.common_env, { MYELIN_INFERENCE_GRPC_PORT = "8001" })
  ports           = { grpc = 8001 }
  grpc_probe_port = 8001
  autoscale = {
    min_replicas      = var.inference_replicas.min
    max_replicas      = var.inference_replicas.max
    cpu_percent       = 70
    p99_latency_s     = 0.05
    p99_latency_label = "Predict"
  }
}

module "ingest" {
  source    = "../service"
  name      = "ingest"
  namespace = kubernetes_namespace_v1.myelin.metadata[0].name
  image     = var.image
  replicas  = var.ingest_replicas.min
  env       = merge(local.common_env, { MYELIN_INGEST_HTTP_PORT = "8080" })
  ports     = { http = 8080 }
  autoscale = {
    min_replicas      = var.ingest_replicas.min
    max_replicas      = var.ingest_replicas.max
    cpu_percent       = 70
    p99_latency_s     = 0.25
    p99_latency_label = "ingest_http"
  }
}

module "retrainer" {
  source     = "../service"
  name       = "retrainer"
  namespace  = kubernetes_namespace_v1.myelin.metadata[0].name
  image      = var.image
  env        = local.common_env
  secret_env = local.secret_env
}

module "ops" {
  source    = "../service"
  name      = "ops"
  namespace = kubernetes_namespace_v1.myelin.metadata[0].name
  image     = var.image
  env       = merge(local.common_env, { MYELIN_OPS_HTTP_PORT = "8090" })
  ports     = { http = 8090 }
  resources = {
    cpu_request    = "100m"
    cpu_limit      = "500m"
    memory_request = "128Mi"
    memory_limit   = "512Mi"
  }
}
