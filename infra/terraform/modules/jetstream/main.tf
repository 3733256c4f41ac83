# Streams, KV buckets and the fixed-name durable consumers of the platform, all read
# from the generated topology file: nothing here names a stream by hand.
locals {
  topology = jsondecode(file(var.topology_file))
  # KV buckets are declared as the streams behind them, as the platform provisions them:
  # rollup headers refused (with them, whoever may write one key could wipe the bucket),
  # and single deletes allowed only in an erasable bucket (the per-subject PII keys)
  buckets = {
    for k, v in local.topology.kv_buckets : "KV_${k}" => {
      subjects             = ["$KV.${k}.>"]
      max_age_s            = v.ttl_s
      duplicate_window_s   = v.ttl_s > 0 ? min(v.ttl_s, 120) : 120
      discard              = "new"
      max_msgs_per_subject = v.history
      deny_delete          = !v.erasable
    }
  }
  streams = merge(
    { for k, v in local.topology.streams : k => merge(v, {
      discard              = "old"
      max_msgs_per_subject = -1
      deny_delete          = false
    }) },
    local.buckets,
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
  allow_rollup_hdrs    = false
  deny_delete          = each.value.deny_delete
  max_bytes            = var.max_bytes_per_stream
  replicas             = var.replicas
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
