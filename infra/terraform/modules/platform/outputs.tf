output "namespace" {
  description = "Where the platform runs."
  value       = kubernetes_namespace_v1.myelin.metadata[0].name
}

output "streams" {
  description = "The JetStream streams declared."
  value       = module.jetstream.streams
}

output "opa_bundle_sha256" {
  description = "The policy bundle's digest."
  value       = module.opa.bundle_sha256
}
