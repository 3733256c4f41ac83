# Streams, KV buckets and the fixed-name durable consumers of the platform, all read
# from the generated topology file: nothing here names a stream by hand.
locals {
  topology = jsondecode(file(var.topology_file))
  # A KV bucket refuses deleting single messages; an erasable one (the per-subject PII
  # keys, securely deleted on erasure) is declared as the stream behind it instead
  buckets = { for k, v in local.topology.kv_buckets : k => v if !v.erasable }
  erasable_buckets = {
    for k, v in local.topology.kv_buckets : "KV_${k}" => {
      subjects             = ["$KV.${k}.>"]
      max_age_s            = 0
      duplicate_window_s   = 120
      discard              = "new"
      max_msgs_per_subject = v.history
      allow_rollup_hdrs    = true
    } if v.erasable
  }
  streams = merge(
    { for k, v in local.topology.streams : k => merge(v, {
      discard              = "old"
      max_msgs_per_subject = -1
      allow_rollup_hdrs    = false
    }) },
    local.erasable_buckets,
  )
  consumers = local.topology.consumers
}

resource "jetstream_stream" "stream" {
  for_each             = local.streams
  name                 = each.key
  subjects             = each.value.subjects
  storage              = "file"
  retention            = "limits"
  discard              = each.value.discard
  max_age              = each.value.max_age_s
  duplicate_window     = each.value.duplicate_window_s
  max_msgs_per_subject = each.value.max_msgs_per_subject
  allow_rollup_hdrs    = each.value.allow_rollup_hdrs
  deny_delete          = false
  max_bytes            = var.max_bytes_per_stream
  replicas             = var.replicas
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
