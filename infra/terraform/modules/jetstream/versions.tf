terraform {
  required_version = ">= 1.6"
  required_providers {
    jetstream = {
      source  = "nats-io/jetstream"
      version = "~> 0.1"
    }
  }
}
