# Derived values shared by the resources.

data "aws_partition" "current" {}
data "aws_region" "current" {}
data "aws_caller_identity" "current" {}

locals {
  tags   = merge({ project = "pg-cdc-s3" }, var.tags)
  retain = var.removal_policy == "retain"

  base_path = trim(var.base_path, "/")
  # "{base}/{rest}", or "{rest}" when the base path is empty.
  key_prefix         = local.base_path == "" ? "" : "${local.base_path}/"
  staging_prefix     = "${local.key_prefix}_staging/"
  dead_letter_prefix = "${local.key_prefix}_dead_letter/"

  # The metric catalogue the Rust code emits: a copy of cdc-contract/metrics.json (the infra tests
  # check that the two are equal).
  metrics = jsondecode(file("${path.module}/metrics.json"))

  compactor_zip = coalesce(var.compactor_zip, "${path.module}/../../target/lambda/compactor/bootstrap.zip")

  # The sources keyed by name, every default filled in.
  sources = { for s in var.sources : s.name => merge(s, {
    key               = replace(s.name, "/[^A-Za-z0-9]/", "")
    cpu               = coalesce(s.cpu, var.capture.cpu)
    memory_mib        = coalesce(s.memory_mib, var.capture.memory_mib)
    flush_max_bytes   = coalesce(s.flush_max_bytes, var.capture.flush_max_bytes)
    flush_interval_ms = coalesce(s.flush_interval_ms, var.capture.flush_interval_ms)
    lag_alarm_seconds = coalesce(s.lag_alarm_seconds, var.alarms.replication_lag_seconds)
    # verify-ca and verify-full check the server against the RDS bundle unless told otherwise.
    ssl_root_cert = s.ssl_root_cert != null ? s.ssl_root_cert : (startswith(s.ssl_mode, "verify-") ? "/etc/ssl/rds/global-bundle.pem" : null)
  }) }

  # Sources without an existing secret get a placeholder secret to fill in.
  generated_secrets = { for k, s in local.sources : k => s if s.password_secret_arn == null && s.password_secret_name == null }

  # The ECR repository of the capture image, when it is in ECR: the execution roles may pull from it only.
  capture_image_ecr = try(regex("^([0-9]{12})\\.dkr\\.ecr\\.([a-z0-9-]+)\\.amazonaws\\.com(?:\\.cn)?/([^:@]+)", var.capture_image), null)
  capture_image_repository_arn = local.capture_image_ecr == null ? null : format(
    "arn:%s:ecr:%s:%s:repository/%s",
    data.aws_partition.current.partition, local.capture_image_ecr[1], local.capture_image_ecr[0], local.capture_image_ecr[2],
  )
}
