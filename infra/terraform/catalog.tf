# The query side (lib/catalog.ts): a Glue database the compactor keeps one table per captured table
# in (the final Parquet files, partitions by projection, so no partition is ever registered), and
# an Athena workgroup with its own results bucket. None of it with catalog.enabled false.

locals {
  # On by default when the compactor writes Parquet: the catalog's tables are the Parquet files.
  catalog_enabled    = coalesce(var.catalog.enabled, contains([for f in split(",", var.compactor.output_formats) : trimspace(f)], "parquet"))
  glue_database_name = coalesce(var.catalog.database_name, lower(replace(var.name, "-", "_")))
  # Glue authorises the compactor's calls on the catalog, the database and the table together;
  # tables are named after captured tables at run time.
  glue_arn_prefix = "arn:${data.aws_partition.current.partition}:glue:${data.aws_region.current.region}:${data.aws_caller_identity.current.account_id}"
}

# Deleted with the module whatever removal_policy says: it holds only table definitions, which the
# compactor writes again.
resource "aws_glue_catalog_database" "this" {
  count       = local.catalog_enabled ? 1 : 0
  name        = local.glue_database_name
  catalog_id  = data.aws_caller_identity.current.account_id
  description = "Tables of the change data capture pipeline ${var.name}: one per captured table, kept by its compactor"
  tags        = local.tags
}

# Query results only: Athena writes them with the querying principal's credentials. Encrypted,
# private and TLS-only like the data bucket; they expire, since a result can be run again.
resource "aws_s3_bucket" "athena_results" {
  #checkov:skip=CKV_AWS_18:Server access logs would need a second bucket and cost per request logged; Athena writes here for the principals who query, whose queries CloudTrail and the workgroup's history record.
  #checkov:skip=CKV_AWS_144:Query results expire after catalog.results_retention_days and can be produced again by running the query: replicating them would only double their cost.
  #checkov:skip=CKV_AWS_145:SSE-S3 (AES256), as the workgroup enforces: a customer-managed key costs $1/month at rest plus a request per result read and written.
  #checkov:skip=CKV_AWS_21:Query results are written once and expire; versions would keep every overwritten or expired result billed for nothing.
  #checkov:skip=CKV2_AWS_62:Nothing consumes S3 event notifications of query results: Athena reports a query's completion through its own API.
  count         = local.catalog_enabled ? 1 : 0
  bucket_prefix = "${lower(substr(var.name, 0, 22))}-results-"
  force_destroy = !local.retain
  tags          = local.tags
}

resource "aws_s3_bucket_ownership_controls" "athena_results" {
  count  = local.catalog_enabled ? 1 : 0
  bucket = aws_s3_bucket.athena_results[0].id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "athena_results" {
  count                   = local.catalog_enabled ? 1 : 0
  bucket                  = aws_s3_bucket.athena_results[0].id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_server_side_encryption_configuration" "athena_results" {
  count  = local.catalog_enabled ? 1 : 0
  bucket = aws_s3_bucket.athena_results[0].id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "athena_results" {
  count  = local.catalog_enabled ? 1 : 0
  bucket = aws_s3_bucket.athena_results[0].id

  rule {
    id     = "ExpireQueryResults"
    status = "Enabled"
    filter {}
    expiration {
      days = var.catalog.results_retention_days
    }
    # Parts of an upload a failed query left behind; no query runs for a day.
    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }
}

# TLS only, version 1.2 at least.
data "aws_iam_policy_document" "athena_results" {
  count = local.catalog_enabled ? 1 : 0
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.athena_results[0].arn, "${aws_s3_bucket.athena_results[0].arn}/*"]
    principals {
      type        = "AWS"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
  statement {
    sid       = "DenyOldTls"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.athena_results[0].arn, "${aws_s3_bucket.athena_results[0].arn}/*"]
    principals {
      type        = "AWS"
      identifiers = ["*"]
    }
    condition {
      test     = "NumericLessThan"
      variable = "s3:TlsVersion"
      values   = ["1.2"]
    }
  }
}

resource "aws_s3_bucket_policy" "athena_results" {
  count  = local.catalog_enabled ? 1 : 0
  bucket = aws_s3_bucket.athena_results[0].id
  policy = data.aws_iam_policy_document.athena_results[0].json
  # A policy put before the public access block could be refused as public.
  depends_on = [aws_s3_bucket_public_access_block.athena_results]
}

resource "aws_athena_workgroup" "this" {
  count       = local.catalog_enabled ? 1 : 0
  name        = var.name
  description = "Queries on the tables of the Glue database ${local.glue_database_name}"
  state       = "ENABLED"
  # Deleted with the module like the database, saved queries included.
  force_destroy = true
  tags          = local.tags

  configuration {
    # Clients cannot send results elsewhere or unencrypted.
    enforce_workgroup_configuration    = true
    publish_cloudwatch_metrics_enabled = true

    result_configuration {
      output_location = "s3://${aws_s3_bucket.athena_results[0].bucket}/results/"
      # Never a bucket of the same name in another account.
      expected_bucket_owner = data.aws_caller_identity.current.account_id

      encryption_configuration {
        encryption_option = "SSE_S3"
      }
    }
  }
}
