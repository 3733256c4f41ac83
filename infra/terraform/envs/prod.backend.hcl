bucket = "myelin-terraform-state"
key    = "myelin/prod/terraform.tfstate"
region = "eu-west-1"
