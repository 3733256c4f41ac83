# Streams, KV buckets and the fixed-name durable consumers of the platform, all read
# from the generated topology file: nothing here names a stream by hand.
locals {
  topology  = jsondecode(file(var.topology_file))
  streams   = local.topology.streams
  buckets   = local.topology.kv_buckets
  consumers = local.topology.consumers
}

resource "jetstream_stream" "stream" {
  for_each         = local.streams
  name             = each.key
  subjects         = each.value.subjects
  storage          = "file"
  retention        = "limits"
  discard          = "old"
  max_age          = each.value.max_age_s
  duplicate_window = each.value.duplicate_window_s
  max_bytes        = var.max_bytes_per_stream
  replicas         = var.replicas
}

resource "jetstream_kv_bucket" "bucket" {
  for_each = local.buckets
  name     = each.key
  history  = each.value.history
  ttl      = each.value.ttl_s > 0 ? each.value.ttl_s : null
  replicas = var.replicas
}

# The services own their consumers' positions: a drain re-creates its consumer right
# after its own ack floor at start. Terraform declares them (name, filter, ack policy,
# limits) and leaves those changes alone.
resource "jetstream_consumer" "consumer" {
  for_each        = local.consumers
  stream_id       = jetstream_stream.stream[each.value.stream].id
  durable_name    = each.key
  description     = "owned by the ${each.value.owner} service"
  deliver_all     = true
  filter_subject  = each.value.filter_subject == ">" ? null : each.value.filter_subject
  ack_policy      = each.value.ack_policy
  ack_wait        = each.value.ack_wait_s
  max_ack_pending = each.value.max_ack_pending
  lifecycle {
    ignore_changes = [deliver_all]
  }
}
