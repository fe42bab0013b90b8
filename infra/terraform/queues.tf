# The notification queue (capture -> compactor), its dead-letter queue, and the queue of
# dead-letter notices (records the compactor moved to the _dead_letter/ prefix). SQS-managed
# encryption (no KMS key) and TLS only.

resource "aws_sqs_queue" "notify_dead_letter" {
  name                      = "${var.name}-notify-dlq"
  message_retention_seconds = 1209600 # 14 days
  sqs_managed_sse_enabled   = true
  tags                      = local.tags
}

resource "aws_sqs_queue" "notify" {
  name = "${var.name}-notify"
  # AWS: at least six times the function timeout, plus the batching window.
  visibility_timeout_seconds = 6 * var.compactor.timeout_seconds + var.compactor.max_batching_window_seconds
  message_retention_seconds  = 345600 # 4 days
  sqs_managed_sse_enabled    = true
  redrive_policy = jsonencode({
    deadLetterTargetArn = aws_sqs_queue.notify_dead_letter.arn
    maxReceiveCount     = var.queue.max_receive_count
  })
  tags = local.tags
}

resource "aws_sqs_queue" "dead_letter_notices" {
  name                      = "${var.name}-dead-letter-notices"
  message_retention_seconds = 1209600 # 14 days
  sqs_managed_sse_enabled   = true
  tags                      = local.tags
}

locals {
  queues = {
    notify_dead_letter  = aws_sqs_queue.notify_dead_letter
    notify              = aws_sqs_queue.notify
    dead_letter_notices = aws_sqs_queue.dead_letter_notices
  }
}

data "aws_iam_policy_document" "queue_tls" {
  for_each = local.queues
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["sqs:*"]
    resources = [each.value.arn]
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
}

resource "aws_sqs_queue_policy" "tls" {
  for_each  = local.queues
  queue_url = each.value.id
  policy    = data.aws_iam_policy_document.queue_tls[each.key].json
}
