environment  = "prod"
kube_context = "myelin-prod"
nats_servers = "nats-0.nats.nats.svc:4222,nats-1.nats.nats.svc:4222,nats-2.nats.nats.svc:4222,nats-3.nats.nats.svc:4222,nats-4.nats.nats.svc:4222"
# release digests: replace with the image you ship (tags are refused)
image     = "ghcr.io/myelin/myelin@sha256:0000000000000000000000000000000000000000000000000000000000000000"
opa_image = "docker.io/openpolicyagent/opa@sha256:0000000000000000000000000000000000000000000000000000000000000000"
sizes = {
  stream_replicas    = 3
  partitions         = 64
  features_workers   = { min = 4, max = 32 }
  ingest_replicas    = { min = 4, max = 24 }
  inference_replicas = { min = 6, max = 48 }
  redis              = { shards = 6, replicas_per_shard = 1 }
  clickhouse         = { shards = 2, replicas = 2, storage_size = "1Ti" }
}
