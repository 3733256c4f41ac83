output "streams" {
  description = "Every stream's name and subjects."
  value       = { for k, s in jetstream_stream.stream : k => s.subjects }
}

output "kv_buckets" {
  description = "Every KV bucket's name."
  value       = keys(jetstream_kv_bucket.bucket)
}

output "consumers" {
  description = "Every fixed-name durable consumer."
  value       = keys(jetstream_consumer.consumer)
}
