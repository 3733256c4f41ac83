# The policy bundle for OPA: the same .rego files the embedded evaluator (regopy) runs,
# packed as an OPA bundle and served to OPA pods from a ConfigMap. Governance points
# MYELIN_OPA_URL at the Service; every decision is still audited by governance.
locals {
  labels = {
    "app.kubernetes.io/name"    = "myelin-opa"
    "app.kubernetes.io/part-of" = "myelin"
  }
  policies = fileset(var.policy_dir, "*.rego")
}

data "archive_file" "bundle" {
  type        = "zip"
  output_path = "${path.module}/.build/myelin-policies.zip"
  dynamic "source" {
    for_each = local.policies
    content {
      content  = file("${var.policy_dir}/${source.value}")
      filename = source.value
    }
  }
}

resource "kubernetes_config_map_v1" "policies" {
  metadata {
    name      = "myelin-policies"
    namespace = var.namespace
    labels    = local.labels
    annotations = {
      "myelin/bundle-sha256" = data.archive_file.bundle.output_base64sha256
    }
  }
  data = { for f in local.policies : f => file("${var.policy_dir}/${f}") }
}

resource "kubernetes_service_account_v1" "opa" {
  metadata {
    name      = "myelin-opa"
    namespace = var.namespace
    labels    = local.labels
  }
  automount_service_account_token = false
}

resource "kubernetes_deployment_v1" "opa" {
  metadata {
    name      = "myelin-opa"
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
        annotations = {
          # a new bundle rolls the pods
          "myelin/bundle-sha256" = data.archive_file.bundle.output_base64sha256
        }
      }
      spec {
        service_account_name            = kubernetes_service_account_v1.opa.metadata[0].name
        automount_service_account_token = false
        security_context {
          run_as_non_root = true
          run_as_user     = 10001
          seccomp_profile {
            type = "RuntimeDefault"
          }
        }
        container {
          name              = "opa"
          image             = var.image
          image_pull_policy = "Always"
          args = [
            "run", "--server", "--addr=0.0.0.0:8181", "--log-level=info",
            "--disable-telemetry", "/policies",
          ]
          port {
            name           = "http"
            container_port = 8181
          }
          liveness_probe {
            http_get {
              path = "/health"
              port = 8181
            }
          }
          readiness_probe {
            http_get {
              path = "/health?bundles=true"
              port = 8181
            }
          }
          resources {
            requests = { cpu = "100m", memory = "128Mi" }
            limits   = { cpu = "1", memory = "512Mi" }
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
            name       = "policies"
            mount_path = "/policies"
            read_only  = true
          }
        }
        volume {
          name = "policies"
          config_map {
            name = kubernetes_config_map_v1.policies.metadata[0].name
          }
        }
      }
    }
  }
}

resource "kubernetes_service_v1" "opa" {
  metadata {
    name      = "myelin-opa"
    namespace = var.namespace
    labels    = local.labels
  }
  spec {
    selector = local.labels
    port {
      name        = "http"
      port        = 8181
      target_port = 8181
    }
  }
}
