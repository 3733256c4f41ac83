output "deployment" {
  description = "The Deployment's name."
  value       = kubernetes_deployment_v1.this.metadata[0].name
}

output "service" {
  description = "The Service's name (null when the service serves no port)."
  value       = length(kubernetes_service_v1.this) > 0 ? kubernetes_service_v1.this[0].metadata[0].name : null
}
