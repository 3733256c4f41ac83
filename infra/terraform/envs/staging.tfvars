environment  = "staging"
kube_context = "myelin-staging"
nats_servers = "nats-0.nats.nats.svc:4222,nats-1.nats.nats.svc:4222,nats-2.nats.nats.svc:4222"
# release digests: replace with the image you ship (tags are refused)
image     = "ghcr.io/myelin/myelin@sha256:0000000000000000000000000000000000000000000000000000000000000000"
opa_image = "docker.io/openpolicyagent/opa@sha256:0000000000000000000000000000000000000000000000000000000000000000"
sizes = {
  stream_replicas    = 3
  partitions         = 16
  features_workers   = { min = 2, max = 8 }
  ingest_replicas    = { min = 2, max = 6 }
  inference_replicas = { min = 2, max = 6 }
  redis              = { shards = 3, replicas_per_shard = 1 }
  clickhouse         = { shards = 1, replicas = 2, storage_size = "200Gi" }
}
