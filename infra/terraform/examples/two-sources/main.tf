# Example: the pipeline for two source databases, as infra/config.example.json configures the CDK
# app. Copy this directory, edit it, then:
#
#   terraform init && terraform apply
#
# It expects the capture image pushed to ECR and the compactor zip built with cargo-lambda (see
# the README's "Deploying with Terraform").

terraform {
  required_version = ">= 1.9"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 6.25, < 7.0"
    }
  }
}

provider "aws" {
  region = "eu-west-1"
}

variable "capture_image" {
  description = "The capture image (linux/arm64) in ECR."
  type        = string
  default     = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/pgcdc-capture:latest"
}

module "pipeline" {
  # From a git checkout: source = "git::https://example.com/your-org/pg-cdc-s3.git//infra/terraform?ref=v1.0.0"
  source = "../.."

  name          = "PgCdcS3"
  base_path     = "cdc"
  capture_image = var.capture_image
  compactor_zip = "${path.module}/../../../../target/lambda/compactor/bootstrap.zip"

  compactor = {
    output_formats            = "jsonl,parquet"
    open_hour_compact_minutes = 15
  }

  catalog = {
    enabled                = true
    results_retention_days = 30
  }

  alarms = {
    email                   = "data-platform-oncall@example.com"
    replication_lag_seconds = 900
  }

  sources = [
    {
      name                = "orders"
      host                = "orders.cluster-abcdefghijkl.eu-west-1.rds.amazonaws.com"
      database            = "orders"
      user                = "cdc_user"
      password_secret_arn = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:pgcdc/orders-cdc-user-AbCdEf"
      slot_name           = "cdc_orders"
      publication         = "cdc_publication"
      tables              = ["public.orders", "public.order_items"]
      ssl_mode            = "verify-full"
      ssl_root_cert       = "/etc/ssl/rds/global-bundle.pem"
    },
    {
      name                  = "billing"
      host                  = "billing-db.internal.example.com"
      port                  = 5433
      database              = "billing"
      user                  = "cdc_user"
      password_secret_name  = "pgcdc/billing"
      password_secret_field = "password"
      slot_name             = "cdc_billing"
      ssl_mode              = "require"
      cpu                   = 512
      memory_mib            = 1024
      flush_interval_ms     = 30000
    },
  ]
}

output "BucketName" {
  value = module.pipeline.BucketName
}

output "LedgerTableName" {
  value = module.pipeline.LedgerTableName
}

output "NotifyDeadLetterQueueUrl" {
  value = module.pipeline.NotifyDeadLetterQueueUrl
}

output "CaptureSecurityGroupId" {
  value = module.pipeline.CaptureSecurityGroupId
}

output "DashboardName" {
  value = module.pipeline.DashboardName
}

output "CaptureService" {
  value = module.pipeline.CaptureService
}

output "GlueDatabaseName" {
  value = module.pipeline.GlueDatabaseName
}

output "AthenaWorkGroupName" {
  value = module.pipeline.AthenaWorkGroupName
}
