# One capture service per source database: an always-on ECS Fargate task streaming the source's
# replication slot into the staging prefix, the ledger and the notification queue.

locals {
  # The ledger actions both binaries use. TransactWriteItems is no IAM action of its own: DynamoDB
  # authorises each item of a transaction through PutItem, UpdateItem, DeleteItem or
  # ConditionCheckItem. DescribeTable is the start-up check; BatchGetItem the compactor's plan
  # reading flush records.
  ledger_actions = [
    "dynamodb:DescribeTable",
    "dynamodb:GetItem",
    "dynamodb:PutItem",
    "dynamodb:UpdateItem",
    "dynamodb:DeleteItem",
    "dynamodb:Query",
    "dynamodb:BatchWriteItem",
    "dynamodb:BatchGetItem",
    "dynamodb:ConditionCheckItem",
  ]

  # The port the capture's /healthz listens on (HEALTH_PORT).
  health_port = 8080

  # The password secret of each source: the given ARN, the name (the ARN without its random
  # suffix, which ECS accepts), or the placeholder secret created below.
  secret_arn = { for k, s in local.sources : k => (
    s.password_secret_arn != null ? s.password_secret_arn :
    s.password_secret_name != null ? format("arn:%s:secretsmanager:%s:%s:secret:%s", data.aws_partition.current.partition, data.aws_region.current.region, data.aws_caller_identity.current.account_id, s.password_secret_name) :
    aws_secretsmanager_secret.password[k].arn
  ) }
  # What the execution role may read: a secret given by name has a 6-character suffix that is not
  # known here, so its ARN ends in -??????.
  secret_grant = { for k, s in local.sources : k => (
    s.password_secret_name != null ? "${local.secret_arn[k]}-??????" : local.secret_arn[k]
  ) }

  # The container's environment, per source.
  capture_environment = { for k, s in local.sources : k => merge(
    {
      POSTGRES_HOST     = s.host
      POSTGRES_PORT     = tostring(s.port)
      POSTGRES_DATABASE = s.database
      POSTGRES_USER     = s.user
      CDC_SLOT_NAME     = s.slot_name
      CDC_PUBLICATION   = s.publication
      PGSSLMODE         = s.ssl_mode
      S3_BUCKET_NAME    = aws_s3_bucket.data.bucket
      S3_BASE_PATH      = local.base_path
      LEDGER_TABLE      = aws_dynamodb_table.ledger.name
      NOTIFY_QUEUE_URL  = aws_sqs_queue.notify.url
      FLUSH_MAX_BYTES   = tostring(s.flush_max_bytes)
      FLUSH_INTERVAL_MS = tostring(s.flush_interval_ms)
      # The capture notifies when its checkpoint passes an hour's end plus this grace: equal to the compactor's.
      CLOSE_GRACE_SECONDS = tostring(var.compactor.close_grace_seconds)
      AWS_REGION          = data.aws_region.current.region
      LOG_FORMAT          = "json"
      HEALTH_PORT         = tostring(local.health_port)
      METRICS_PER_TABLE   = tostring(s.metrics_per_table)
    },
    length(s.tables) > 0 ? { CDC_TABLES = join(",", s.tables) } : {},
    s.ssl_root_cert != null ? { PGSSLROOTCERT = s.ssl_root_cert } : {},
  ) }
}

resource "aws_ecs_cluster" "this" {
  #checkov:skip=CKV_AWS_65:Container Insights bills per-task custom metrics; the dashboard uses the free ECS service CPU/memory metrics and the capture's own lag metric, whose absence raises the capture-down alarm.
  name = var.name
  tags = local.tags

  setting {
    name  = "containerInsights"
    value = "disabled"
  }
}

resource "aws_ecs_cluster_capacity_providers" "this" {
  count              = var.capture.spot ? 1 : 0
  cluster_name       = aws_ecs_cluster.this.name
  capacity_providers = ["FARGATE", "FARGATE_SPOT"]
}

resource "aws_cloudwatch_log_group" "capture" {
  #checkov:skip=CKV_AWS_158:Encrypted by CloudWatch Logs' own keys: a customer-managed KMS key costs $1/month at rest; the log holds no change data.
  #checkov:skip=CKV_AWS_338:Retention is var.log_retention_days (30 by default), as in the CDK app: a year of logs is billed storage nobody reads.
  for_each          = local.sources
  name              = "/pgcdc/${var.name}/capture-${each.key}"
  retention_in_days = var.log_retention_days
  skip_destroy      = local.retain
  tags              = local.tags
}

# A placeholder for a source without a secret: set it to the real password of the PostgreSQL user.
# Its first value is random; later changes made outside Terraform are kept.
data "aws_secretsmanager_random_password" "placeholder" {
  for_each            = local.generated_secrets
  password_length     = 32
  exclude_punctuation = true
}

resource "aws_secretsmanager_secret" "password" {
  #checkov:skip=CKV_AWS_149:Encrypted with the AWS-managed key (aws/secretsmanager): a customer-managed key costs $1/month at rest.
  #checkov:skip=CKV2_AWS_57:The password belongs to a PostgreSQL role the database owner manages; rotating it here would not change it in the database. Rotate it in the database, then update this secret.
  for_each                = local.generated_secrets
  name_prefix             = "${var.name}-${each.key}-password-"
  description             = "Password of PostgreSQL user ${each.value.user} for the ${each.key} capture (placeholder: set it to the real password)"
  recovery_window_in_days = local.retain ? 30 : 0
  tags                    = local.tags
}

resource "aws_secretsmanager_secret_version" "password" {
  for_each      = local.generated_secrets
  secret_id     = aws_secretsmanager_secret.password[each.key].id
  secret_string = data.aws_secretsmanager_random_password.placeholder[each.key].random_password

  lifecycle {
    ignore_changes = [secret_string]
  }
}

data "aws_iam_policy_document" "ecs_tasks_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ecs-tasks.amazonaws.com"]
    }
  }
}

# Execution role: pulls the image, writes the task's log, reads the password.
resource "aws_iam_role" "capture_execution" {
  for_each           = local.sources
  name_prefix        = substr("${var.name}-${each.key}-exec-", 0, 38)
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
  tags               = local.tags
}

data "aws_iam_policy_document" "capture_execution" {
  #checkov:skip=CKV_AWS_356:ecr:GetAuthorizationToken has no resource-level permissions; every other action names this source's log group, secret and key, and the image's repository.
  for_each = local.sources

  # ecr:GetAuthorizationToken has no resource-level permissions.
  dynamic "statement" {
    for_each = local.capture_image_repository_arn == null ? [] : [local.capture_image_repository_arn]
    content {
      sid       = "EcrAuth"
      actions   = ["ecr:GetAuthorizationToken"]
      resources = ["*"]
    }
  }
  dynamic "statement" {
    for_each = local.capture_image_repository_arn == null ? [] : [local.capture_image_repository_arn]
    content {
      sid       = "PullImage"
      actions   = ["ecr:BatchCheckLayerAvailability", "ecr:GetDownloadUrlForLayer", "ecr:BatchGetImage"]
      resources = [statement.value]
    }
  }
  statement {
    sid       = "Logs"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = ["${aws_cloudwatch_log_group.capture[each.key].arn}:*"]
  }
  statement {
    sid       = "Password"
    actions   = ["secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"]
    resources = [local.secret_grant[each.key]]
  }
  dynamic "statement" {
    for_each = each.value.password_secret_kms_key_arn == null ? [] : [each.value.password_secret_kms_key_arn]
    content {
      sid       = "PasswordKey"
      actions   = ["kms:Decrypt"]
      resources = [statement.value]
    }
  }
}

resource "aws_iam_role_policy" "capture_execution" {
  for_each = local.sources
  name     = "execution"
  role     = aws_iam_role.capture_execution[each.key].id
  policy   = data.aws_iam_policy_document.capture_execution[each.key].json
}

# Task role, least privilege: writes staging objects only, uses the ledger and notifies.
resource "aws_iam_role" "capture_task" {
  for_each           = local.sources
  name_prefix        = substr("${var.name}-${each.key}-task-", 0, 38)
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
  tags               = local.tags
}

data "aws_iam_policy_document" "capture_task" {
  statement {
    # Keys are derived from the batches' content (table, hour, LSN range): a prefix wildcard.
    sid       = "PutStagingObjects"
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.data.arn}/${local.staging_prefix}*"]
  }
  statement {
    # The start-up check (HeadBucket) is authorised as s3:ListBucket.
    sid       = "CheckBucket"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.data.arn]
  }
  statement {
    sid       = "Ledger"
    actions   = local.ledger_actions
    resources = [aws_dynamodb_table.ledger.arn]
  }
  statement {
    sid       = "Notify"
    actions   = ["sqs:SendMessage"]
    resources = [aws_sqs_queue.notify.arn]
  }
}

resource "aws_iam_role_policy" "capture_task" {
  for_each = local.sources
  name     = "capture"
  role     = aws_iam_role.capture_task[each.key].id
  policy   = data.aws_iam_policy_document.capture_task.json
}

resource "aws_ecs_task_definition" "capture" {
  for_each                 = local.sources
  family                   = "${var.name}-capture-${each.key}"
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = tostring(each.value.cpu)
  memory                   = tostring(each.value.memory_mib)
  execution_role_arn       = aws_iam_role.capture_execution[each.key].arn
  task_role_arn            = aws_iam_role.capture_task[each.key].arn
  tags                     = local.tags

  runtime_platform {
    cpu_architecture        = "ARM64"
    operating_system_family = "LINUX"
  }

  container_definitions = jsonencode([{
    name        = "capture"
    image       = var.capture_image
    essential   = true
    environment = [for name, value in local.capture_environment[each.key] : { name = name, value = value }]
    secrets = [{
      name = "POSTGRES_PASSWORD"
      # ARN[:json-key::] selects a key of a JSON secret.
      valueFrom = each.value.password_secret_field == null ? local.secret_arn[each.key] : "${local.secret_arn[each.key]}:${each.value.password_secret_field}::"
    }]
    logConfiguration = {
      logDriver = "awslogs"
      options = {
        awslogs-group         = aws_cloudwatch_log_group.capture[each.key].name
        awslogs-stream-prefix = "capture"
        awslogs-region        = data.aws_region.current.region
      }
    }
    healthCheck = {
      # The binary probes its own http://127.0.0.1:HEALTH_PORT/healthz (the image has no shell or curl).
      command     = ["CMD", "/usr/local/bin/capture", "healthcheck"]
      interval    = 30
      timeout     = 5
      retries     = 3
      startPeriod = 60
    }
    # On SIGTERM the capture finishes its flush and stops; give it Fargate's maximum.
    stopTimeout = 120
    # It writes nothing locally outside LOCAL TEST MODE.
    readonlyRootFilesystem = true
  }])

  # The placeholder secret must hold a value before a task can start.
  depends_on = [aws_secretsmanager_secret_version.password]
}

resource "aws_ecs_service" "capture" {
  #checkov:skip=CKV_AWS_333:Public IPs are assigned only in public subnets (the created VPC, or an existing VPC's public subnets): the no-NAT-gateway cost choice; the security group has no inbound rule.
  for_each         = local.sources
  name             = "capture-${each.key}"
  cluster          = aws_ecs_cluster.this.id
  task_definition  = aws_ecs_task_definition.capture[each.key].arn
  platform_version = "LATEST"
  # Spot: a reclaimed task gets SIGTERM two minutes ahead, records what it buffered and releases
  # the lease; the replacement resumes from the ledger.
  launch_type = var.capture.spot ? null : "FARGATE"
  # One writer per slot: a deployment stops the old task before it starts the new one.
  desired_count                      = 1
  deployment_minimum_healthy_percent = 0
  deployment_maximum_percent         = 100
  enable_execute_command             = false
  enable_ecs_managed_tags            = false
  propagate_tags                     = "SERVICE"
  tags                               = local.tags

  deployment_circuit_breaker {
    enable   = true
    rollback = true
  }

  network_configuration {
    subnets          = local.subnet_ids
    security_groups  = [aws_security_group.capture.id]
    assign_public_ip = local.assign_public_ip
  }

  dynamic "capacity_provider_strategy" {
    for_each = var.capture.spot ? ["FARGATE_SPOT"] : []
    content {
      capacity_provider = capacity_provider_strategy.value
      weight            = 1
    }
  }

  # The task role's policy must exist before the task starts.
  depends_on = [aws_iam_role_policy.capture_task, aws_ecs_cluster_capacity_providers.this]
}
