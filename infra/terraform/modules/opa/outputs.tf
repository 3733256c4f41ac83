output "url" {
  description = "MYELIN_OPA_URL for governance."
  value       = "http://myelin-opa.${var.namespace}.svc:8181"
}

output "bundle_sha256" {
  description = "The policy bundle's digest (changes roll the OPA pods)."
  value       = data.archive_file.bundle.output_base64sha256
}
