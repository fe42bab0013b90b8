# The CDK stack's outputs, under the same names. The CDK app has one output per source
# (CaptureService{name}, CaptureLogGroup{name}, PasswordSecret{name}, the name without its dashes);
# here each is one map keyed by the same name.

output "BucketName" {
  description = "The bucket (S3_BUCKET_NAME)."
  value       = aws_s3_bucket.data.bucket
}

output "BasePath" {
  description = "S3_BASE_PATH, or (bucket root)."
  value       = local.base_path == "" ? "(bucket root)" : local.base_path
}

output "LedgerTableName" {
  description = "The DynamoDB ledger (LEDGER_TABLE)."
  value       = aws_dynamodb_table.ledger.name
}

output "NotifyQueueUrl" {
  description = "The notification queue (capture to compactor)."
  value       = aws_sqs_queue.notify.url
}

output "NotifyDeadLetterQueueUrl" {
  description = "The notification queue's dead-letter queue (cdc-status --notify-dlq-url)."
  value       = aws_sqs_queue.notify_dead_letter.url
}

output "DeadLetterNoticesQueueUrl" {
  description = "The compactor's notices of records it moved to the _dead_letter/ prefix."
  value       = aws_sqs_queue.dead_letter_notices.url
}

output "CompactorFunctionName" {
  description = "The compactor Lambda (aws lambda invoke --function-name)."
  value       = aws_lambda_function.compactor.function_name
}

output "CaptureSecurityGroupId" {
  description = "Allow inbound PostgreSQL from this group on the source databases' security groups."
  value       = aws_security_group.capture.id
}

output "DashboardName" {
  description = "The CloudWatch dashboard."
  value       = aws_cloudwatch_dashboard.this.dashboard_name
}

output "ClusterName" {
  description = "The ECS cluster of the capture services (aws ecs update-service --cluster)."
  value       = aws_ecs_cluster.this.name
}

output "CompactorLogGroupName" {
  description = "The compactor's log group."
  value       = aws_cloudwatch_log_group.compactor.name
}

output "GlueDatabaseName" {
  description = "The Glue database the compactor keeps one table per captured table in (GLUE_DATABASE); null without the catalog."
  value       = one(aws_glue_catalog_database.this[*].name)
}

output "AthenaWorkGroupName" {
  description = "The Athena workgroup to query in (aws athena start-query-execution --work-group); null without the catalog."
  value       = one(aws_athena_workgroup.this[*].name)
}

output "AthenaResultsBucketName" {
  description = "The bucket of the workgroup's query results; null without the catalog."
  value       = one(aws_s3_bucket.athena_results[*].bucket)
}

output "CaptureService" {
  description = "The capture service of each source, by source name."
  value       = { for k, s in local.sources : s.key => aws_ecs_service.capture[k].name }
}

output "CaptureLogGroup" {
  description = "The capture log group of each source, by source name."
  value       = { for k, s in local.sources : s.key => aws_cloudwatch_log_group.capture[k].name }
}

output "PasswordSecret" {
  description = "The placeholder secret of each source configured without one, by source name: put the password of its PostgreSQL user there."
  value       = { for k, s in local.generated_secrets : s.key => aws_secretsmanager_secret.password[k].arn }
}
