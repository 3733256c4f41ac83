environment  = "dev"
kube_context = "myelin-dev"
nats_servers = "nats-0.nats.nats-dev.svc:4222"
# release digests: replace with the image you ship (tags are refused)
image     = "ghcr.io/myelin/myelin@sha256:0000000000000000000000000000000000000000000000000000000000000000"
opa_image = "docker.io/openpolicyagent/opa@sha256:0000000000000000000000000000000000000000000000000000000000000000"
sizes = {
  stream_replicas    = 1
  partitions         = 8
  features_workers   = { min = 1, max = 2 }
  ingest_replicas    = { min = 1, max = 2 }
  inference_replicas = { min = 1, max = 2 }
  redis              = { shards = 3, replicas_per_shard = 0 }
  clickhouse         = { shards = 1, replicas = 1, storage_size = "20Gi" }
}
