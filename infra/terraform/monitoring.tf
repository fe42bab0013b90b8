# The alarms and the dashboard: a graph for every metric of metrics.json (cdc-contract/metrics.json),
# one line per slot, plus the AWS metrics that show the pipeline's health.

locals {
  period    = 300
  namespace = local.metrics.namespace
  dimension = local.metrics.dimension
  # Every alarm notifies the topic, when there is one, on alarm and back to OK.
  alarm_actions = var.alarms.email == null ? [] : [aws_sns_topic.alarms[0].arn]

  # The statistic a graph shows for a metric (infra/lib/metrics.ts): gauges (lag, WAL, pending
  # work) their worst value, per-event counts and sizes their sum, latencies and durations a high
  # percentile.
  metric_statistic = { for m in local.metrics.metrics : m.name => (
    length(regexall("Lag|Wal|Pending", m.name)) > 0 ? (m.name == "SlotSafeWalBytes" ? "Minimum" : "Maximum") :
    contains(["Milliseconds", "Seconds"], m.unit) ? "p99" : "Sum"
  ) }
}

# No KMS key: alarm notifications carry no data, CloudWatch cannot publish to a topic under the
# AWS-managed SNS key, and a customer-managed key costs $1/month at rest.
resource "aws_sns_topic" "alarms" {
  #checkov:skip=CKV_AWS_26:No KMS key: alarm notifications carry no data, CloudWatch cannot publish to a topic under the AWS-managed SNS key, and a customer-managed key costs $1/month at rest.
  count        = var.alarms.email == null ? 0 : 1
  name         = "${var.name}-alarms"
  display_name = "${var.name} alarms"
  tags         = local.tags
}

data "aws_iam_policy_document" "alarm_topic" {
  count = var.alarms.email == null ? 0 : 1
  statement {
    sid       = "AllowPublishThroughSSLOnly"
    effect    = "Deny"
    actions   = ["sns:Publish"]
    resources = [aws_sns_topic.alarms[0].arn]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
  statement {
    sid       = "AllowCloudWatchAlarms"
    actions   = ["sns:Publish"]
    resources = [aws_sns_topic.alarms[0].arn]
    principals {
      type        = "Service"
      identifiers = ["cloudwatch.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [data.aws_caller_identity.current.account_id]
    }
  }
}

resource "aws_sns_topic_policy" "alarms" {
  count  = var.alarms.email == null ? 0 : 1
  arn    = aws_sns_topic.alarms[0].arn
  policy = data.aws_iam_policy_document.alarm_topic[0].json
}

resource "aws_sns_topic_subscription" "email" {
  count     = var.alarms.email == null ? 0 : 1
  topic_arn = aws_sns_topic.alarms[0].arn
  protocol  = "email"
  endpoint  = var.alarms.email
}

# ---- Per source ---------------------------------------------------------------------------------

resource "aws_cloudwatch_metric_alarm" "replication_lag" {
  for_each          = local.sources
  alarm_name        = "${var.name}-${each.key}-replication-lag"
  alarm_description = "Capture ${each.key} (slot ${each.value.slot_name}) is more than ${each.value.lag_alarm_seconds} s behind the database."
  namespace         = local.namespace
  metric_name       = "ReplicationLagSeconds"
  dimensions        = { (local.dimension) = each.value.slot_name }
  statistic         = "Maximum"
  period            = local.period
  threshold         = each.value.lag_alarm_seconds
  # A capture that reports nothing is the capture-down alarm's business.
  comparison_operator = "GreaterThanThreshold"
  evaluation_periods  = 1
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
  tags                = local.tags
}

resource "aws_cloudwatch_metric_alarm" "capture_down" {
  for_each          = local.sources
  alarm_name        = "${var.name}-${each.key}-capture-down"
  alarm_description = "Capture ${each.key} (slot ${each.value.slot_name}) reported no ReplicationLagSeconds for ${var.alarms.capture_down_minutes} minutes: the task is down, crash-looping or cannot reach the database."
  # The capture reports its lag at every heartbeat (30 s by default): silence means it is down.
  # This costs one alarm instead of Container Insights' per-task metrics.
  namespace           = local.namespace
  metric_name         = "ReplicationLagSeconds"
  dimensions          = { (local.dimension) = each.value.slot_name }
  statistic           = "SampleCount"
  period              = local.period
  threshold           = 1
  comparison_operator = "LessThanThreshold"
  evaluation_periods  = var.alarms.capture_down_minutes / 5
  datapoints_to_alarm = var.alarms.capture_down_minutes / 5
  treat_missing_data  = "breaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
  tags                = local.tags
}

resource "aws_cloudwatch_metric_alarm" "pending_hour_age" {
  for_each            = local.sources
  alarm_name          = "${var.name}-${each.key}-pending-hour-age"
  alarm_description   = "A closed table-hour of ${each.key} (slot ${each.value.slot_name}) has waited more than ${var.alarms.pending_hour_age_seconds} s past its end for compaction: an hour fails (see the compactor log and its Errors alarm) or the capture stopped closing hours."
  namespace           = local.namespace
  metric_name         = "OldestPendingHourAge"
  dimensions          = { (local.dimension) = each.value.slot_name }
  statistic           = "Maximum"
  period              = local.period
  threshold           = var.alarms.pending_hour_age_seconds
  comparison_operator = "GreaterThanThreshold"
  evaluation_periods  = 1
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
  tags                = local.tags
}

resource "aws_cloudwatch_metric_alarm" "slot_wal" {
  for_each            = local.sources
  alarm_name          = "${var.name}-${each.key}-slot-wal"
  alarm_description   = "The replication slot ${each.value.slot_name} of ${each.key} is unreserved or lost (wal_status): changes will be or are gone from the server; the capture must catch up or the slot be recreated."
  namespace           = local.namespace
  metric_name         = "SlotWalLost"
  dimensions          = { (local.dimension) = each.value.slot_name }
  statistic           = "Maximum"
  period              = local.period
  threshold           = 1
  comparison_operator = "GreaterThanOrEqualToThreshold"
  evaluation_periods  = 1
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
  tags                = local.tags
}

# Only with the catalog. Any failure alarms (each is one after the compactor's retries), and the
# alarm clears only after three periods without one: a lasting failure recurs at the next runs (the
# compactor tries a failed update again at its next sweep and at each compaction of the table) and
# holds the alarm instead of flapping. The metric is emitted only on failure.
resource "aws_cloudwatch_metric_alarm" "catalog_updates" {
  for_each            = local.catalog_enabled ? local.sources : {}
  alarm_name          = "${var.name}-${each.key}-catalog-updates"
  alarm_description   = "The compactor failed to create or update Glue tables of ${each.key} (slot ${each.value.slot_name}) in the database ${local.glue_database_name} after its retries: compaction goes on, but Athena may not see new tables or columns; see the compactor log."
  namespace           = local.namespace
  metric_name         = "CatalogUpdateFailures"
  dimensions          = { (local.dimension) = each.value.slot_name }
  statistic           = "Sum"
  period              = local.period
  threshold           = 0
  comparison_operator = "GreaterThanThreshold"
  evaluation_periods  = 3
  datapoints_to_alarm = 1
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
  tags                = local.tags
}

# ---- Pipeline-wide ------------------------------------------------------------------------------

resource "aws_cloudwatch_metric_alarm" "notify_dead_letters" {
  alarm_name          = "${var.name}-notification-dlq"
  alarm_description   = "Notifications the compactor failed on repeatedly are in the dead-letter queue. Nothing is lost (the scheduled sweep compacts what the ledger holds) but the compactor keeps failing."
  namespace           = "AWS/SQS"
  metric_name         = "ApproximateNumberOfMessagesVisible"
  dimensions          = { QueueName = aws_sqs_queue.notify_dead_letter.name }
  statistic           = "Maximum"
  period              = local.period
  threshold           = 0
  comparison_operator = "GreaterThanThreshold"
  evaluation_periods  = 1
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
  tags                = local.tags
}

resource "aws_cloudwatch_metric_alarm" "dead_letter_records" {
  alarm_name          = "${var.name}-dead-letter-records"
  alarm_description   = "The compactor found staged records it cannot read and moved them to the _dead_letter/ prefix; the notices queue names them."
  namespace           = "AWS/SQS"
  metric_name         = "ApproximateNumberOfMessagesVisible"
  dimensions          = { QueueName = aws_sqs_queue.dead_letter_notices.name }
  statistic           = "Maximum"
  period              = local.period
  threshold           = 0
  comparison_operator = "GreaterThanThreshold"
  evaluation_periods  = 1
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
  tags                = local.tags
}

resource "aws_cloudwatch_metric_alarm" "compactor_errors" {
  alarm_name          = "${var.name}-compactor-errors"
  alarm_description   = "The compactor Lambda failed (error or timeout); see its log group."
  namespace           = "AWS/Lambda"
  metric_name         = "Errors"
  dimensions          = { FunctionName = aws_lambda_function.compactor.function_name }
  statistic           = "Sum"
  period              = local.period
  threshold           = 0
  comparison_operator = "GreaterThanThreshold"
  evaluation_periods  = 1
  treat_missing_data  = "notBreaching"
  alarm_actions       = local.alarm_actions
  ok_actions          = local.alarm_actions
  tags                = local.tags
}

# ---- Dashboard ----------------------------------------------------------------------------------

locals {
  region      = data.aws_region.current.region
  source_list = values(local.sources)
  alarm_arns = concat(
    flatten([for k in keys(local.sources) : [
      aws_cloudwatch_metric_alarm.replication_lag[k].arn,
      aws_cloudwatch_metric_alarm.capture_down[k].arn,
      aws_cloudwatch_metric_alarm.pending_hour_age[k].arn,
      aws_cloudwatch_metric_alarm.slot_wal[k].arn,
    ]]),
    [for a in values(aws_cloudwatch_metric_alarm.catalog_updates) : a.arn],
    [
      aws_cloudwatch_metric_alarm.notify_dead_letters.arn,
      aws_cloudwatch_metric_alarm.dead_letter_records.arn,
      aws_cloudwatch_metric_alarm.compactor_errors.arn,
    ],
  )

  # The pipeline's own metrics first, one graph per metric, one line per slot.
  metric_widgets = [for m in local.metrics.metrics : {
    type   = "metric"
    width  = 8
    height = 6
    properties = {
      view   = "timeSeries"
      title  = "${m.name} (${m.emitter}, ${local.metric_statistic[m.name]})"
      region = local.region
      metrics = [for s in local.source_list : [
        local.namespace, m.name, local.dimension, s.slot_name, { label = s.name, stat = local.metric_statistic[m.name] }
      ]]
      yAxis = { left = { label = m.unit, showUnits = false, min = 0 } }
    }
  }]

  aws_widgets = [
    {
      type = "metric", width = 8, height = 6
      properties = {
        view   = "timeSeries"
        title  = "Compactor invocations, errors and throttles"
        region = local.region
        metrics = [for name in ["Invocations", "Errors", "Throttles"] :
          ["AWS/Lambda", name, "FunctionName", aws_lambda_function.compactor.function_name, { stat = "Sum" }]
        ]
      }
    },
    {
      type = "metric", width = 8, height = 6
      properties = {
        view   = "timeSeries"
        title  = "Compactor duration (p99, max)"
        region = local.region
        metrics = [for stat in ["p99", "Maximum"] :
          ["AWS/Lambda", "Duration", "FunctionName", aws_lambda_function.compactor.function_name, { stat = stat }]
        ]
        annotations = { horizontal = [{ value = var.compactor.timeout_seconds * 1000, label = "timeout" }] }
      }
    },
    {
      type = "metric", width = 8, height = 6
      properties = {
        view   = "timeSeries"
        title  = "Dead-letter queues (messages visible)"
        region = local.region
        metrics = [
          ["AWS/SQS", "ApproximateNumberOfMessagesVisible", "QueueName", aws_sqs_queue.notify_dead_letter.name, { label = "notification DLQ", stat = "Maximum" }],
          ["AWS/SQS", "ApproximateNumberOfMessagesVisible", "QueueName", aws_sqs_queue.dead_letter_notices.name, { label = "dead-letter notices", stat = "Maximum" }],
        ]
      }
    },
    {
      type = "metric", width = 8, height = 6
      properties = {
        view   = "timeSeries"
        title  = "Notification queue"
        region = local.region
        metrics = [
          ["AWS/SQS", "ApproximateNumberOfMessagesVisible", "QueueName", aws_sqs_queue.notify.name, { label = "visible", stat = "Maximum" }],
          ["AWS/SQS", "ApproximateAgeOfOldestMessage", "QueueName", aws_sqs_queue.notify.name, { label = "oldest (s)", stat = "Maximum", yAxis = "right" }],
        ]
      }
    },
    {
      type = "metric", width = 8, height = 6
      properties = {
        view   = "timeSeries"
        title  = "Capture CPU utilization (%)"
        region = local.region
        metrics = [for k, s in local.sources :
          ["AWS/ECS", "CPUUtilization", "ClusterName", aws_ecs_cluster.this.name, "ServiceName", aws_ecs_service.capture[k].name, { label = k, stat = "Maximum" }]
        ]
        yAxis = { left = { min = 0, max = 100 } }
      }
    },
    {
      type = "metric", width = 8, height = 6
      properties = {
        view   = "timeSeries"
        title  = "Capture memory utilization (%)"
        region = local.region
        metrics = [for k, s in local.sources :
          ["AWS/ECS", "MemoryUtilization", "ClusterName", aws_ecs_cluster.this.name, "ServiceName", aws_ecs_service.capture[k].name, { label = k, stat = "Maximum" }]
        ]
        yAxis = { left = { min = 0, max = 100 } }
      }
    },
  ]

  # Laid out left to right, three graphs a row, below a text and an alarm status row.
  graphs = concat(local.metric_widgets, local.aws_widgets)
  dashboard_widgets = concat(
    [
      {
        type = "text", width = 24, height = 2, x = 0, y = 0
        properties = {
          markdown   = "# ${var.name}: PostgreSQL change data capture to S3\nNamespace `${local.namespace}`, one line per slot (dimension `${local.dimension}`): ${join(", ", [for s in local.source_list : "${s.name} = `${s.slot_name}`"])}"
          background = "transparent"
        }
      },
      {
        type       = "alarm", width = 24, height = 3, x = 0, y = 2
        properties = { title = "Alarms", alarms = local.alarm_arns }
      },
    ],
    [for i, w in local.graphs : merge(w, { x = (i % 3) * 8, y = 5 + floor(i / 3) * 6 })],
  )
}

resource "aws_cloudwatch_dashboard" "this" {
  dashboard_name = var.name
  dashboard_body = jsonencode({ start = "-PT12H", widgets = local.dashboard_widgets })
}
