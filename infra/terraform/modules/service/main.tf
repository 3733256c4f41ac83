# One Myelin service on Kubernetes: its service account, Deployment (probes on the
# service's own /livez and /readyz, MYELIN_HEALTH_HTTP_PORT; gRPC health for inference),
# Service, PodDisruptionBudget, and autoscaling (HPA on CPU and p99 latency, or KEDA on
# consumer lag).
locals {
  health_port = 8086
  labels = {
    "app.kubernetes.io/name"      = "myelin-${var.name}"
    "app.kubernetes.io/part-of"   = "myelin"
    "app.kubernetes.io/component" = var.name
  }
  env = merge(var.env, {
    MYELIN_HOST             = "0.0.0.0" # the pod's own address; NetworkPolicy limits who reaches it
    MYELIN_HEALTH_HTTP_PORT = tostring(local.health_port)
  })
}

resource "kubernetes_service_account_v1" "this" {
  metadata {
    name      = "myelin-${var.name}"
    namespace = var.namespace
    labels    = local.labels
  }
  automount_service_account_token = false
}

resource "kubernetes_deployment_v1" "this" {
  metadata {
    name      = "myelin-${var.name}"
    namespace = var.namespace
    labels    = local.labels
  }
  spec {
    replicas = var.replicas
    selector {
      match_labels = local.labels
    }
    template {
      metadata {
        labels = local.labels
      }
      spec {
        service_account_name            = kubernetes_service_account_v1.this.metadata[0].name
        automount_service_account_token = false
        termination_grace_period_seconds = 60 # drains: stop intake, flush, ack
        security_context {
          run_as_non_root = true
          run_as_user     = 10001
          run_as_group    = 10001
          fs_group        = 10001
          seccomp_profile {
            type = "RuntimeDefault"
          }
        }
        container {
          name              = var.name
          image             = var.image
          image_pull_policy = "Always"
          args              = ["python", "-m", "services.${var.name}"]
          dynamic "env" {
            for_each = local.env
            content {
              name  = env.key
              value = env.value
            }
          }
          dynamic "env" {
            for_each = var.secret_env
            content {
              name = env.key
              value_from {
                secret_key_ref {
                  name = var.secret_name
                  key  = env.value
                }
              }
            }
          }
          port {
            name           = "health"
            container_port = local.health_port
          }
          dynamic "port" {
            for_each = var.ports
            content {
              name           = port.key
              container_port = port.value
            }
          }
          liveness_probe {
            http_get {
              path = "/livez"
              port = local.health_port
            }
            period_seconds    = 10
            failure_threshold = 6
          }
          dynamic "readiness_probe" {
            for_each = var.grpc_probe_port == null ? [1] : []
            content {
              http_get {
                path = "/readyz"
                port = local.health_port
              }
              period_seconds    = 5
              failure_threshold = 2
            }
          }
          dynamic "readiness_probe" {
            for_each = var.grpc_probe_port == null ? [] : [1]
            content {
              grpc {
                port = var.grpc_probe_port
              }
              period_seconds    = 5
              failure_threshold = 2
            }
          }
          resources {
            requests = {
              cpu    = var.resources.cpu_request
              memory = var.resources.memory_request
            }
            limits = {
              cpu    = var.resources.cpu_limit
              memory = var.resources.memory_limit
            }
          }
          security_context {
            allow_privilege_escalation = false
            privileged                 = false
            read_only_root_filesystem  = true
            run_as_non_root            = true
            capabilities {
              drop = ["ALL"]
            }
          }
          volume_mount {
            name       = "state"
            mount_path = "/var/lib/myelin"
          }
        }
        volume {
          name = "state"
          empty_dir {}
        }
      }
    }
  }
}

resource "kubernetes_service_v1" "this" {
  count = length(var.ports) > 0 ? 1 : 0
  metadata {
    name      = "myelin-${var.name}"
    namespace = var.namespace
    labels    = local.labels
  }
  spec {
    selector = local.labels
    dynamic "port" {
      for_each = var.ports
      content {
        name        = port.key
        port        = port.value
        target_port = port.value
      }
    }
  }
}

resource "kubernetes_pod_disruption_budget_v1" "this" {
  metadata {
    name      = "myelin-${var.name}"
    namespace = var.namespace
    labels    = local.labels
  }
  spec {
    max_unavailable = "1"
    selector {
      match_labels = local.labels
    }
  }
}

resource "kubernetes_horizontal_pod_autoscaler_v2" "this" {
  count = var.autoscale == null ? 0 : 1
  metadata {
    name      = "myelin-${var.name}"
    namespace = var.namespace
    labels    = local.labels
  }
  spec {
    min_replicas = var.autoscale.min_replicas
    max_replicas = var.autoscale.max_replicas
    scale_target_ref {
      api_version = "apps/v1"
      kind        = "Deployment"
      name        = kubernetes_deployment_v1.this.metadata[0].name
    }
    metric {
      type = "Resource"
      resource {
        name = "cpu"
        target {
          type                = "Utilization"
          average_utilization = var.autoscale.cpu_percent
        }
      }
    }
    dynamic "metric" {
      for_each = var.autoscale.p99_latency_s == null ? [] : [1]
      content {
        type = "Pods"
        pods {
          metric {
            name = "myelin_rpc_p99_seconds" # prometheus-adapter rule in deploy/prometheus/README.md
            selector {
              match_labels = { rpc = var.autoscale.p99_latency_label }
            }
          }
          target {
            type          = "AverageValue"
            average_value = tostring(var.autoscale.p99_latency_s)
          }
        }
      }
    }
  }
}

resource "kubernetes_manifest" "lag_scaler" {
  count = var.lag_scaler == null ? 0 : 1
  manifest = {
    apiVersion = "keda.sh/v1alpha1"
    kind       = "ScaledObject"
    metadata = {
      name      = "myelin-${var.name}"
      namespace = var.namespace
      labels    = local.labels
    }
    spec = {
      scaleTargetRef  = { name = kubernetes_deployment_v1.this.metadata[0].name }
      minReplicaCount = var.lag_scaler.min_replicas
      maxReplicaCount = var.lag_scaler.max_replicas
      pollingInterval = 15
      cooldownPeriod  = 300 # partitions move on every change: do not flap
      triggers = [{
        type = "prometheus"
        metadata = {
          serverAddress = var.lag_scaler.prometheus_address
          query         = var.lag_scaler.query
          threshold     = tostring(var.lag_scaler.threshold)
        }
      }]
    }
  }
}
