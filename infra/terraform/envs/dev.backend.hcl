bucket = "myelin-terraform-state"
key    = "myelin/dev/terraform.tfstate"
region = "eu-west-1"
