# The PostgreSQL-to-S3 change data capture pipeline as a Terraform module: the same deployment as
# the CDK app in infra/ (bucket, ledger, queues, one capture service per source database, the
# compactor Lambda, the Glue database and Athena workgroup, the dashboard and the alarms), with the
# same defaults and the same cost at rest: no NAT gateway, no interface endpoint, no KMS key, no
# Container Insights.
#
# Terraform 1.9 or later: variable validations refer to other variables.

terraform {
  required_version = ">= 1.9"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 6.25, < 7.0"
    }
  }
}
