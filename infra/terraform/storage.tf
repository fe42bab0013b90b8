# The bucket (staging micro-batches, final files, manifests, dead letters) and the DynamoDB ledger.

resource "aws_s3_bucket" "data" {
  #checkov:skip=CKV_AWS_18:Server access logs would need a second bucket and cost per request logged; every writer is one of this module's roles, and CloudTrail data events can be enabled when an audit needs them.
  #checkov:skip=CKV_AWS_144:Cross-region replication doubles storage and request costs; the final files can be rebuilt from the source databases, and replication can be added outside the module.
  #checkov:skip=CKV_AWS_145:SSE-S3 (AES256) instead of a KMS key: a customer-managed key costs $1/month at rest plus a request per object read and written.
  #checkov:skip=CKV_AWS_21:Versioning is off by default (var.versioned): the ledger and the manifests are the truth, not object versions, and every rewrite would be billed twice.
  #checkov:skip=CKV2_AWS_62:Nothing consumes S3 event notifications: the capture notifies the compactor through SQS after the ledger records a batch.
  #checkov:skip=CKV2_AWS_61:The lifecycle configuration is the aws_s3_bucket_lifecycle_configuration resource below.
  bucket        = var.bucket_name
  bucket_prefix = var.bucket_name == null ? "${lower(substr(var.name, 0, 30))}-" : null
  # removal_policy destroy empties the bucket before deleting it (a non-empty bucket cannot be deleted).
  force_destroy = !local.retain
  tags          = local.tags
}

resource "aws_s3_bucket_ownership_controls" "data" {
  bucket = aws_s3_bucket.data.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "data" {
  bucket                  = aws_s3_bucket.data.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_server_side_encryption_configuration" "data" {
  bucket = aws_s3_bucket.data.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

resource "aws_s3_bucket_versioning" "data" {
  count  = var.versioned ? 1 : 0
  bucket = aws_s3_bucket.data.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "data" {
  bucket = aws_s3_bucket.data.id

  # Only what the compactor marked: a staging object is tagged compacted=true once the ledger
  # records its batch as compacted.
  rule {
    id     = "ExpireCompactedStaging"
    status = "Enabled"
    filter {
      and {
        prefix = local.staging_prefix
        tags   = { compacted = "true" }
      }
    }
    expiration {
      days = var.staging_expiration_days
    }
    dynamic "noncurrent_version_expiration" {
      for_each = var.versioned ? [1] : []
      content {
        noncurrent_days = 1
      }
    }
  }

  # Everything else under staging, after a safe age: orphans of flushes that never committed and
  # batches of retired snapshots are never tagged. The pending-hour alarm fires long before.
  rule {
    id     = "ExpireAllStaging"
    status = "Enabled"
    filter {
      prefix = local.staging_prefix
    }
    expiration {
      days = var.staging_max_age_days
    }
    dynamic "noncurrent_version_expiration" {
      for_each = var.versioned ? [1] : []
      content {
        noncurrent_days = 1
      }
    }
  }

  # Parts of multipart uploads a crashed compactor left behind are invisible but billed.
  rule {
    id     = "AbortIncompleteMultipartUploads"
    status = "Enabled"
    filter {}
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }

  # Versioning must be set before rules on noncurrent versions apply.
  depends_on = [aws_s3_bucket_versioning.data]
}

# TLS only, version 1.2 at least.
data "aws_iam_policy_document" "bucket" {
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.data.arn, "${aws_s3_bucket.data.arn}/*"]
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
    resources = [aws_s3_bucket.data.arn, "${aws_s3_bucket.data.arn}/*"]
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

resource "aws_s3_bucket_policy" "data" {
  bucket = aws_s3_bucket.data.id
  policy = data.aws_iam_policy_document.bucket.json
  # A policy put before the public access block could be refused as public.
  depends_on = [aws_s3_bucket_public_access_block.data]
}

resource "aws_dynamodb_table" "ledger" {
  #checkov:skip=CKV_AWS_119:Encrypted with the AWS-owned key: a customer-managed key costs $1/month at rest plus a request per read and write.
  name         = "${var.name}-ledger"
  billing_mode = "PAY_PER_REQUEST"
  hash_key     = "pk"
  range_key    = "sk"

  attribute {
    name = "pk"
    type = "S"
  }
  attribute {
    name = "sk"
    type = "S"
  }

  point_in_time_recovery {
    enabled = true
  }

  ttl {
    attribute_name = "expires_at"
    enabled        = true
  }

  deletion_protection_enabled = local.retain
  tags                        = local.tags
}
