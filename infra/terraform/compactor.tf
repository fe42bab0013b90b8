# The compactor Lambda: triggered by the notification queue and by a sweep every few minutes.

resource "aws_cloudwatch_log_group" "compactor" {
  #checkov:skip=CKV_AWS_158:Encrypted by CloudWatch Logs' own keys: a customer-managed KMS key costs $1/month at rest; the log holds no change data.
  #checkov:skip=CKV_AWS_338:Retention is var.log_retention_days (30 by default), as in the CDK app: a year of logs is billed storage nobody reads.
  name              = "/pgcdc/${var.name}/compactor"
  retention_in_days = var.log_retention_days
  skip_destroy      = local.retain
  tags              = local.tags
}

data "aws_iam_policy_document" "lambda_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["lambda.amazonaws.com"]
    }
  }
}

# An own role instead of the AWSLambdaBasicExecutionRole managed policy, which may write any log group.
resource "aws_iam_role" "compactor" {
  name_prefix        = substr("${var.name}-compactor-", 0, 38)
  description        = "The compactor Lambda: staging and final objects, the ledger, dead-letter notices"
  assume_role_policy = data.aws_iam_policy_document.lambda_assume.json
  tags               = local.tags
}

data "aws_iam_policy_document" "compactor" {
  statement {
    sid       = "Logs"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = ["${aws_cloudwatch_log_group.compactor.arn}:*"]
  }
  statement {
    # Read micro-batches, mark them compacted (the lifecycle rule expires them), delete retired ones.
    sid       = "StagingObjects"
    actions   = ["s3:GetObject", "s3:DeleteObject", "s3:PutObjectTagging"]
    resources = ["${aws_s3_bucket.data.arn}/${local.staging_prefix}*"]
  }
  statement {
    # Final files and manifests ({base}/{schema.table}/{format}/...), whose tables are not known
    # here, and dead letters. Multipart uploads need AbortMultipartUpload to clean up.
    sid       = "FinalObjects"
    actions   = ["s3:PutObject", "s3:GetObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
    resources = ["${aws_s3_bucket.data.arn}/${local.key_prefix}*", "${aws_s3_bucket.data.arn}/${local.dead_letter_prefix}*"]
  }
  statement {
    # FinalObjects covers the whole key prefix, staging included: the compactor never writes a
    # staged batch (it reads, tags and deletes them), so nothing it does can overwrite one.
    sid       = "NoStagingWrites"
    effect    = "Deny"
    actions   = ["s3:PutObject", "s3:AbortMultipartUpload"]
    resources = ["${aws_s3_bucket.data.arn}/${local.staging_prefix}*"]
  }
  statement {
    # HeadBucket (the start-up check) and listing an hour's prefix for parts no attempt recorded.
    # No s3:prefix condition: S3 authorises HeadBucket as s3:ListBucket without any prefix.
    sid       = "ListBucket"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.data.arn]
  }
  statement {
    sid       = "Ledger"
    actions   = local.ledger_actions
    resources = [aws_dynamodb_table.ledger.arn]
  }
  statement {
    sid       = "DeadLetterNotices"
    actions   = ["sqs:SendMessage"]
    resources = [aws_sqs_queue.dead_letter_notices.arn]
  }
  statement {
    # What the SQS event source mapping does on the function's behalf.
    sid       = "NotifyQueue"
    actions   = ["sqs:ReceiveMessage", "sqs:ChangeMessageVisibility", "sqs:GetQueueUrl", "sqs:DeleteMessage", "sqs:GetQueueAttributes"]
    resources = [aws_sqs_queue.notify.arn]
  }
  # Only with the catalog (catalog.tf): without it, no Glue permission at all.
  dynamic "statement" {
    for_each = local.catalog_enabled ? [1] : []
    content {
      # Read a table's definition, create it, update its schema: in this database only.
      sid       = "GlueCatalog"
      actions   = ["glue:GetTable", "glue:CreateTable", "glue:UpdateTable"]
      resources = ["${local.glue_arn_prefix}:catalog", aws_glue_catalog_database.this[0].arn, "${local.glue_arn_prefix}:table/${local.glue_database_name}/*"]
    }
  }
}

resource "aws_iam_role_policy" "compactor" {
  name   = "compactor"
  role   = aws_iam_role.compactor.id
  policy = data.aws_iam_policy_document.compactor.json
}

locals {
  compactor_environment = merge(
    {
      S3_BUCKET_NAME        = aws_s3_bucket.data.bucket
      S3_BASE_PATH          = local.base_path
      LEDGER_TABLE          = aws_dynamodb_table.ledger.name
      OUTPUT_FORMATS        = join(",", [for f in split(",", var.compactor.output_formats) : trimspace(f)])
      CLOSE_GRACE_SECONDS   = tostring(var.compactor.close_grace_seconds)
      PART_MAX_BYTES        = tostring(var.compactor.part_max_bytes)
      PARQUET_COMPRESSION   = var.compactor.parquet_compression
      AVRO_CODEC            = var.compactor.avro_codec
      JSONL_COMPRESSION     = var.compactor.jsonl_compression
      DEAD_LETTER_QUEUE_URL = aws_sqs_queue.dead_letter_notices.url
      # An attempt that lost its claim lives at most the function's timeout: past it, no late
      # upload can land, and the hour is listed once more for strays.
      STRAGGLER_WINDOW_SECONDS  = tostring(var.compactor.timeout_seconds + 60)
      OPEN_HOUR_COMPACT_MINUTES = tostring(var.compactor.open_hour_compact_minutes)
      LOG_FORMAT                = "json"
    },
    var.compactor.slot_filter != null ? { CDC_SLOT_NAME = var.compactor.slot_filter } : {},
    # Without it the compactor makes no catalog call.
    local.catalog_enabled ? { GLUE_DATABASE = aws_glue_catalog_database.this[0].name } : {},
  )
}

resource "aws_lambda_function" "compactor" {
  #checkov:skip=CKV_AWS_117:The compactor reaches only S3, DynamoDB and SQS through their public endpoints; a VPC would need a NAT gateway or endpoints, which the cost-at-rest contract excludes.
  #checkov:skip=CKV_AWS_116:Failures are handled by the notification queue's redrive policy (SQS trigger) and by the next sweep (schedule): a function DLQ would hold nothing else.
  #checkov:skip=CKV_AWS_272:The zip is built from this repository by cargo-lambda; code signing needs a signing profile this deployment does not assume.
  #checkov:skip=CKV_AWS_173:The environment holds only resource names and settings, no secret; encrypting it with a customer-managed key would cost $1/month at rest.
  #checkov:skip=CKV_AWS_50:X-Ray tracing bills per trace; the compactor reports its own metrics per table-hour and logs each run.
  #checkov:skip=CKV_AWS_115:Reserved concurrency is var.compactor.reserved_concurrency (none by default, as in the CDK app): the SQS trigger's maximum concurrency bounds it without taking from the account's quota.
  function_name    = "${var.name}-compactor"
  description      = "Rolls staging micro-batches into hour-partitioned JSONL.gz and Parquet files"
  role             = aws_iam_role.compactor.arn
  runtime          = "provided.al2023"
  architectures    = ["arm64"]
  handler          = "bootstrap"
  filename         = local.compactor_zip
  source_code_hash = filebase64sha256(local.compactor_zip)
  memory_size      = var.compactor.memory_mib
  timeout          = var.compactor.timeout_seconds
  # -1: no reserved concurrency.
  reserved_concurrent_executions = var.compactor.reserved_concurrency == null ? -1 : var.compactor.reserved_concurrency
  tags                           = local.tags

  environment {
    variables = local.compactor_environment
  }

  logging_config {
    log_format = "Text"
    log_group  = aws_cloudwatch_log_group.compactor.name
  }

  depends_on = [aws_iam_role_policy.compactor]
}

# Scheduled sweeps are invoked asynchronously: a failed or stale one is not retried, the next
# sweep does the same work.
resource "aws_lambda_function_event_invoke_config" "compactor" {
  function_name                = aws_lambda_function.compactor.function_name
  qualifier                    = "$LATEST"
  maximum_retry_attempts       = 0
  maximum_event_age_in_seconds = 3600
}

resource "aws_lambda_event_source_mapping" "notify" {
  event_source_arn                   = aws_sqs_queue.notify.arn
  function_name                      = aws_lambda_function.compactor.arn
  batch_size                         = var.compactor.batch_size
  maximum_batching_window_in_seconds = var.compactor.max_batching_window_seconds > 0 ? var.compactor.max_batching_window_seconds : null
  function_response_types            = ["ReportBatchItemFailures"]
  tags                               = local.tags

  # Never more pollers than the function may run: throttled batches would count as receives and
  # end up in the dead-letter queue.
  scaling_config {
    maximum_concurrency = var.compactor.max_concurrency
  }
}

resource "aws_cloudwatch_event_rule" "sweep" {
  name                = "${var.name}-compactor-sweep"
  description         = "Compactor sweep: compacts every closed hour the ledger holds as pending"
  schedule_expression = var.compactor.sweep_minutes == 1 ? "rate(1 minute)" : "rate(${var.compactor.sweep_minutes} minutes)"
  tags                = local.tags
}

resource "aws_cloudwatch_event_target" "sweep" {
  rule  = aws_cloudwatch_event_rule.sweep.name
  arn   = aws_lambda_function.compactor.arn
  input = jsonencode({ action = "sweep" })

  retry_policy {
    maximum_retry_attempts       = 2
    maximum_event_age_in_seconds = max(60, var.compactor.sweep_minutes * 60)
  }
}

resource "aws_lambda_permission" "sweep" {
  statement_id  = "AllowSweepSchedule"
  action        = "lambda:InvokeFunction"
  function_name = aws_lambda_function.compactor.function_name
  principal     = "events.amazonaws.com"
  source_arn    = aws_cloudwatch_event_rule.sweep.arn
}
