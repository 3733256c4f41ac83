output "streams" {
  description = "Every stream's name and subjects."
  value       = { for k, s in jetstream_stream.stream : k => s.subjects }
}

output "kv_buckets" {
  description = "Every KV bucket's name (each declared as the stream KV_<name>)."
  value       = [for k in keys(local.buckets) : trimprefix(k, "KV_")]
}

output "consumers" {
  description = "Every fixed-name durable consumer."
  value       = keys(jetstream_consumer.consumer)
}
