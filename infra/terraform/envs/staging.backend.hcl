bucket = "myelin-terraform-state"
key    = "myelin/staging/terraform.tfstate"
region = "eu-west-1"
