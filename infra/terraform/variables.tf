# Inputs. Every default is the CDK app's (infra/lib/config.ts), and every validation the CDK
# configuration makes is made here too, so a value the CDK app refuses is refused at plan time.

variable "name" {
  description = "Name of the deployment (the CDK stack name): prefix of the cluster, the function, the task families, the alarms and the dashboard."
  type        = string
  default     = "PgCdcS3"

  validation {
    condition     = can(regex("^[A-Za-z][A-Za-z0-9-]{0,127}$", var.name))
    error_message = "name must be a letter then letters, digits or -, at most 128 characters."
  }
}

variable "base_path" {
  description = "S3_BASE_PATH: prefix of every key the pipeline writes (\"\" for the bucket's root). Leading and trailing slashes are removed."
  type        = string
  default     = "cdc"

  validation {
    condition     = trim(var.base_path, "/") == "" || can(regex("^[A-Za-z0-9!_.'()=-]+(/[A-Za-z0-9!_.'()=-]+)*$", trim(var.base_path, "/")))
    error_message = "base_path: use letters, digits and !_.'()=- separated by single slashes."
  }
}

variable "bucket_name" {
  description = "Name of the bucket; null lets AWS generate one from the deployment's name."
  type        = string
  default     = null

  validation {
    condition     = var.bucket_name == null || can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.bucket_name))
    error_message = "bucket_name is not a valid bucket name."
  }
}

variable "versioned" {
  description = "S3 versioning (default off: the ledger and the manifests are the truth, not object versions)."
  type        = bool
  default     = false
}

variable "staging_expiration_days" {
  description = "Days after which a staging object tagged compacted=true expires."
  type        = number
  default     = 1

  validation {
    condition     = var.staging_expiration_days >= 1 && var.staging_expiration_days <= 3650 && floor(var.staging_expiration_days) == var.staging_expiration_days
    error_message = "staging_expiration_days must be an integer between 1 and 3650."
  }
}

variable "staging_max_age_days" {
  description = "Days after which every staging object expires, compacted or not (orphans of flushes that never committed, batches of retired snapshots). Must exceed staging_expiration_days and be at least four times alarms.pending_hour_age_seconds."
  type        = number
  default     = 30

  validation {
    condition     = var.staging_max_age_days >= 2 && var.staging_max_age_days <= 3650 && floor(var.staging_max_age_days) == var.staging_max_age_days
    error_message = "staging_max_age_days must be an integer between 2 and 3650."
  }
  validation {
    condition     = var.staging_max_age_days > var.staging_expiration_days
    error_message = "staging_max_age_days must be more than staging_expiration_days."
  }
  validation {
    condition     = var.alarms.pending_hour_age_seconds * 4 <= var.staging_max_age_days * 86400
    error_message = "staging objects would expire less than four times alarms.pending_hour_age_seconds after they were written: a pending hour must alarm well before its batches expire."
  }
}

variable "removal_policy" {
  description = "What `terraform destroy` does with the data: retain (the ledger keeps deletion protection, a non-empty bucket is not deleted, log groups are left in place) or destroy (everything goes, objects included)."
  type        = string
  default     = "retain"

  validation {
    condition     = contains(["retain", "destroy"], var.removal_policy)
    error_message = "removal_policy must be retain or destroy."
  }
}

variable "log_retention_days" {
  description = "CloudWatch Logs retention in days for the capture and compactor logs."
  type        = number
  default     = 30

  validation {
    condition     = contains([1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.log_retention_days)
    error_message = "log_retention_days must be one of 1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653."
  }
}

variable "vpc" {
  description = "An existing VPC: its id, its availability zones and one subnet per zone, either public (tasks get a public IP) or private (your own NAT gateway or VPC endpoints; tasks get no public IP). Null creates a VPC with public subnets only and no NAT gateway."
  type = object({
    vpc_id             = string
    availability_zones = list(string)
    public_subnet_ids  = optional(list(string), [])
    private_subnet_ids = optional(list(string), [])
  })
  default = null

  validation {
    condition     = var.vpc == null ? true : can(regex("^vpc-[0-9a-f]+$", var.vpc.vpc_id))
    error_message = "vpc.vpc_id is not a VPC id."
  }
  validation {
    condition     = var.vpc == null ? true : length(var.vpc.availability_zones) > 0
    error_message = "vpc.availability_zones is required."
  }
  validation {
    condition     = var.vpc == null ? true : ((length(var.vpc.public_subnet_ids) == 0) != (length(var.vpc.private_subnet_ids) == 0))
    error_message = "vpc: give either public_subnet_ids or private_subnet_ids."
  }
  validation {
    condition     = var.vpc == null ? true : length(concat(var.vpc.public_subnet_ids, var.vpc.private_subnet_ids)) == length(var.vpc.availability_zones)
    error_message = "vpc: give one subnet per availability zone, in the same order as vpc.availability_zones."
  }
  validation {
    condition     = var.vpc == null ? true : alltrue([for id in concat(var.vpc.public_subnet_ids, var.vpc.private_subnet_ids) : can(regex("^subnet-[0-9a-f]+$", id))])
    error_message = "vpc: a subnet id is not a subnet id."
  }
}

variable "max_azs" {
  description = "Availability zones of the created VPC (one public /24 subnet each)."
  type        = number
  default     = 2

  validation {
    condition     = var.max_azs >= 1 && var.max_azs <= 6 && floor(var.max_azs) == var.max_azs
    error_message = "max_azs must be an integer between 1 and 6."
  }
}

variable "capture_image" {
  description = "The capture's container image (linux/arm64), built from capture/Dockerfile with the repository root as context and pushed to a registry, e.g. 123456789012.dkr.ecr.eu-west-1.amazonaws.com/pgcdc-capture:1.0.0. An ECR image gets pull rights on its repository only."
  type        = string

  validation {
    condition     = length(trimspace(var.capture_image)) > 0
    error_message = "capture_image must not be empty."
  }
}

variable "capture" {
  description = "Defaults for every capture service: Fargate CPU units and memory (MiB), FLUSH_MAX_BYTES, FLUSH_INTERVAL_MS, and spot (Fargate Spot: about 70% cheaper, interrupted at two minutes' notice)."
  type = object({
    cpu               = optional(number, 256)
    memory_mib        = optional(number, 512)
    flush_max_bytes   = optional(number, 16777216)
    flush_interval_ms = optional(number, 10000)
    spot              = optional(bool, false)
  })
  default  = {}
  nullable = false

  validation {
    condition     = var.capture.cpu >= 256 && var.capture.cpu <= 4096 && var.capture.memory_mib >= 512 && var.capture.memory_mib <= 30720
    error_message = "capture.cpu must be between 256 and 4096, capture.memory_mib between 512 and 30720."
  }
  validation {
    condition     = var.capture.flush_max_bytes >= 65536 && var.capture.flush_max_bytes <= 1073741824 && var.capture.flush_interval_ms >= 100 && var.capture.flush_interval_ms <= 3600000
    error_message = "capture.flush_max_bytes must be between 65536 and 1073741824, capture.flush_interval_ms between 100 and 3600000."
  }
}

variable "compactor_zip" {
  description = "The compactor's cargo-lambda zip (`cargo lambda build --release --arm64 --output-format zip -p compactor`); null means target/lambda/compactor/bootstrap.zip of this repository."
  type        = string
  default     = null
}

variable "compactor" {
  description = "The compactor Lambda: memory (MiB), timeout, reserved concurrency (null: none), the SQS trigger's maximum concurrency, batch size and batching window, the sweep's period, and its OUTPUT_FORMATS, CLOSE_GRACE_SECONDS, PART_MAX_BYTES, PARQUET_COMPRESSION, AVRO_CODEC, JSONL_COMPRESSION, CDC_SLOT_NAME (slot_filter) and OPEN_HOUR_COMPACT_MINUTES (open_hour_compact_minutes: compact hours still open every N minutes, 0 for closed hours only)."
  type = object({
    memory_mib                  = optional(number, 1024)
    timeout_seconds             = optional(number, 300)
    reserved_concurrency        = optional(number)
    max_concurrency             = optional(number, 2)
    batch_size                  = optional(number, 10)
    max_batching_window_seconds = optional(number, 30)
    sweep_minutes               = optional(number, 5)
    output_formats              = optional(string, "jsonl,parquet")
    close_grace_seconds         = optional(number, 300)
    part_max_bytes              = optional(number, 134217728)
    parquet_compression         = optional(string, "snappy")
    avro_codec                  = optional(string, "deflate")
    jsonl_compression           = optional(string, "gzip")
    slot_filter                 = optional(string)
    open_hour_compact_minutes   = optional(number, 15)
  })
  default  = {}
  nullable = false

  validation {
    condition     = var.compactor.memory_mib >= 512 && var.compactor.memory_mib <= 10240 && var.compactor.timeout_seconds >= 10 && var.compactor.timeout_seconds <= 900
    error_message = "compactor.memory_mib must be between 512 (an hour's compaction peaks at 143-213 MB) and 10240, compactor.timeout_seconds between 10 and 900."
  }
  validation {
    # The event source's maximum concurrency must be at least 2.
    condition     = var.compactor.max_concurrency >= 2 && var.compactor.max_concurrency <= 1000
    error_message = "compactor.max_concurrency must be between 2 and 1000."
  }
  validation {
    condition     = var.compactor.reserved_concurrency == null || try(var.compactor.reserved_concurrency > var.compactor.max_concurrency && var.compactor.reserved_concurrency <= 1000, false)
    error_message = "compactor.reserved_concurrency must be more than compactor.max_concurrency: the scheduled and manual sweeps need a slot beside the SQS pollers, which are otherwise throttled into false dead-letter alarms."
  }
  validation {
    condition     = var.compactor.batch_size >= 1 && var.compactor.batch_size <= 10000 && var.compactor.max_batching_window_seconds >= 0 && var.compactor.max_batching_window_seconds <= 300
    error_message = "compactor.batch_size must be between 1 and 10000, compactor.max_batching_window_seconds between 0 and 300."
  }
  validation {
    condition     = var.compactor.batch_size <= 10 || var.compactor.max_batching_window_seconds >= 1
    error_message = "compactor.batch_size above 10 needs compactor.max_batching_window_seconds of at least 1."
  }
  validation {
    condition     = var.compactor.sweep_minutes >= 1 && var.compactor.sweep_minutes <= 1440 && var.compactor.close_grace_seconds >= 0 && var.compactor.close_grace_seconds <= 86400
    error_message = "compactor.sweep_minutes must be between 1 and 1440, compactor.close_grace_seconds between 0 and 86400."
  }
  validation {
    condition     = var.compactor.part_max_bytes >= 4096 && var.compactor.part_max_bytes <= 5368709120
    error_message = "compactor.part_max_bytes must be between 4096 and 5368709120."
  }
  validation {
    condition = (
      alltrue([for f in split(",", var.compactor.output_formats) : contains(["jsonl", "parquet", "avro"], trimspace(f))]) &&
      length(distinct([for f in split(",", var.compactor.output_formats) : trimspace(f)])) == length(split(",", var.compactor.output_formats))
    )
    error_message = "compactor.output_formats must be one or more of jsonl, parquet, avro, comma-separated, without repeats."
  }
  validation {
    condition     = contains(["uncompressed", "snappy", "gzip", "zstd", "lz4"], var.compactor.parquet_compression)
    error_message = "compactor.parquet_compression must be one of uncompressed, snappy, gzip, zstd, lz4."
  }
  validation {
    condition     = contains(["deflate", "snappy", "zstd"], var.compactor.avro_codec)
    error_message = "compactor.avro_codec must be one of deflate, snappy, zstd."
  }
  validation {
    condition     = contains(["gzip", "zstd"], var.compactor.jsonl_compression)
    error_message = "compactor.jsonl_compression must be gzip or zstd."
  }
  validation {
    condition     = var.compactor.slot_filter == null || can(regex("^[a-z0-9_]{1,63}$", coalesce(var.compactor.slot_filter, "-")))
    error_message = "compactor.slot_filter is not a valid slot name."
  }
  validation {
    condition     = var.compactor.open_hour_compact_minutes >= 0 && var.compactor.open_hour_compact_minutes <= 60 && floor(var.compactor.open_hour_compact_minutes) == var.compactor.open_hour_compact_minutes
    error_message = "compactor.open_hour_compact_minutes must be an integer between 0 and 60 (0: closed hours only)."
  }
}

variable "catalog" {
  description = "The query side: enabled (a Glue database the compactor keeps one table per captured table in, GLUE_DATABASE, and an Athena workgroup with its own results bucket; null: on when compactor.output_formats includes parquet), database_name (null: name in lower case, - as _) and results_retention_days (days the query results are kept)."
  type = object({
    enabled                = optional(bool)
    database_name          = optional(string)
    results_retention_days = optional(number, 30)
  })
  default  = {}
  nullable = false

  validation {
    # The catalog's tables are the Parquet files: without them it would describe nothing.
    condition     = var.catalog.enabled != true || contains([for f in split(",", var.compactor.output_formats) : trimspace(f)], "parquet")
    error_message = "catalog.enabled: the catalog's tables are the Parquet files: add parquet to compactor.output_formats, or set catalog.enabled to false."
  }
  validation {
    # Glue and Athena keep database names in lower case; [a-z0-9_] needs no quoting in Athena SQL.
    condition     = var.catalog.database_name == null || can(regex("^[a-z0-9_]{1,255}$", coalesce(var.catalog.database_name, "-")))
    error_message = "catalog.database_name is not a Glue database name for Athena (lower-case letters, digits and _, at most 255)."
  }
  validation {
    condition     = var.catalog.results_retention_days >= 1 && var.catalog.results_retention_days <= 3650 && floor(var.catalog.results_retention_days) == var.catalog.results_retention_days
    error_message = "catalog.results_retention_days must be an integer between 1 and 3650."
  }
}

variable "queue" {
  description = "The notification queue: receives before a notification goes to the dead-letter queue."
  type = object({
    max_receive_count = optional(number, 5)
  })
  default  = {}
  nullable = false

  validation {
    condition     = var.queue.max_receive_count >= 1 && var.queue.max_receive_count <= 1000
    error_message = "queue.max_receive_count must be between 1 and 1000."
  }
}

variable "alarms" {
  description = "Alarms: an email address subscribed to the SNS topic every alarm notifies (null: no topic), the ReplicationLagSeconds threshold, the minutes without a lag report before a capture counts as down (a multiple of 5), and the OldestPendingHourAge threshold."
  type = object({
    email                    = optional(string)
    replication_lag_seconds  = optional(number, 900)
    capture_down_minutes     = optional(number, 15)
    pending_hour_age_seconds = optional(number, 7200)
  })
  default  = {}
  nullable = false

  validation {
    condition     = var.alarms.email == null || can(regex("^[^@\\s]+@[^@\\s]+\\.[^@\\s]+$", coalesce(var.alarms.email, "-")))
    error_message = "alarms.email is not an email address."
  }
  validation {
    condition     = var.alarms.replication_lag_seconds >= 1 && var.alarms.replication_lag_seconds <= 604800
    error_message = "alarms.replication_lag_seconds must be between 1 and 604800."
  }
  validation {
    condition     = var.alarms.capture_down_minutes >= 5 && var.alarms.capture_down_minutes <= 1440 && var.alarms.capture_down_minutes % 5 == 0
    error_message = "alarms.capture_down_minutes must be a multiple of 5 (the alarm period) between 5 and 1440."
  }
  validation {
    condition     = var.alarms.pending_hour_age_seconds >= 300 && var.alarms.pending_hour_age_seconds <= 2592000
    error_message = "alarms.pending_hour_age_seconds must be between 300 and 2592000."
  }
}

variable "sources" {
  description = <<-EOT
    The source databases: one capture service and one replication slot each. Per source: name (a
    letter then letters, digits or -, at most 32), host, port (5432), database, user (a role with
    REPLICATION), the password's secret (password_secret_arn, the complete ARN, or
    password_secret_name, not one ending in a hyphen and six letters or digits; neither creates a
    placeholder secret to fill in), password_secret_field
    (the JSON key when the secret is a JSON document), password_secret_kms_key_arn (when the secret
    is under a customer-managed key), slot_name, publication (cdc_publication), tables
    (schema.table; empty: every table of the publication), ssl_mode (verify-full), ssl_root_cert
    (the RDS bundle in the image for verify-ca and verify-full), cpu, memory_mib, flush_max_bytes,
    flush_interval_ms (default: var.capture), metrics_per_table (false) and lag_alarm_seconds
    (default: alarms.replication_lag_seconds).
  EOT
  type = list(object({
    name                        = string
    host                        = string
    port                        = optional(number, 5432)
    database                    = string
    user                        = string
    password_secret_arn         = optional(string)
    password_secret_name        = optional(string)
    password_secret_field       = optional(string)
    password_secret_kms_key_arn = optional(string)
    slot_name                   = string
    publication                 = optional(string, "cdc_publication")
    tables                      = optional(list(string), [])
    ssl_mode                    = optional(string, "verify-full")
    ssl_root_cert               = optional(string)
    cpu                         = optional(number)
    memory_mib                  = optional(number)
    flush_max_bytes             = optional(number)
    flush_interval_ms           = optional(number)
    metrics_per_table           = optional(bool, false)
    lag_alarm_seconds           = optional(number)
  }))

  validation {
    condition     = length(var.sources) > 0
    error_message = "sources: configure at least one source database."
  }
  validation {
    condition     = alltrue([for s in var.sources : can(regex("^[A-Za-z][A-Za-z0-9-]{0,31}$", s.name))])
    error_message = "sources[].name must be a letter then letters, digits or -, at most 32."
  }
  validation {
    # Names become resource keys and output keys without their dashes, case-insensitively.
    condition     = length(distinct([for s in var.sources : lower(replace(s.name, "-", ""))])) == length(var.sources)
    error_message = "sources[].name: a name appears twice."
  }
  validation {
    condition     = alltrue([for s in var.sources : can(regex("^[a-z0-9_]{1,63}$", s.slot_name))])
    error_message = "sources[].slot_name is not a valid slot name (lower-case letters, digits and _, at most 63)."
  }
  validation {
    # The ledger keys by slot: slot names must be unique in the whole deployment.
    condition     = length(distinct([for s in var.sources : s.slot_name])) == length(var.sources)
    error_message = "sources[].slot_name: a slot name appears twice."
  }
  validation {
    condition     = alltrue([for s in var.sources : trimspace(s.host) != "" && s.port >= 1 && s.port <= 65535])
    error_message = "sources[].host must not be empty and sources[].port must be between 1 and 65535."
  }
  validation {
    condition     = alltrue([for s in var.sources : s.password_secret_arn == null || s.password_secret_name == null])
    error_message = "sources[]: give either password_secret_arn or password_secret_name, not both."
  }
  validation {
    condition     = alltrue([for s in var.sources : s.password_secret_arn == null || can(regex("^arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:[0-9]{12}:secret:.+-[A-Za-z0-9]{6}$", coalesce(s.password_secret_arn, "-")))])
    error_message = "sources[].password_secret_arn must be the complete secret ARN (ending in -XXXXXX); use password_secret_name to give a name."
  }
  validation {
    # ECS reads a secret given by name through its ARN without the random suffix, which Secrets
    # Manager may not resolve when the name itself ends in a hyphen and six letters or digits.
    condition     = alltrue([for s in var.sources : s.password_secret_name == null || !can(regex("-[A-Za-z0-9]{6}$", coalesce(s.password_secret_name, "-")))])
    error_message = "sources[].password_secret_name ends in a hyphen and six letters or digits, which Secrets Manager may take for its random suffix when ECS looks the secret up by name: give password_secret_arn, the complete ARN, instead."
  }
  validation {
    condition     = alltrue([for s in var.sources : contains(["disable", "prefer", "require", "verify-ca", "verify-full"], s.ssl_mode)])
    error_message = "sources[].ssl_mode must be one of disable, prefer, require, verify-ca, verify-full."
  }
  validation {
    condition     = alltrue(flatten([for s in var.sources : [for t in s.tables : can(regex("^[A-Za-z_][A-Za-z0-9_$]*\\.[A-Za-z_][A-Za-z0-9_$]*$", t))]]))
    error_message = "sources[].tables: every table must be schema.table."
  }
  validation {
    # Fargate's valid CPU units and, for each, the memory sizes (MiB) it accepts.
    condition = alltrue([for s in var.sources : (
      coalesce(s.cpu, var.capture.cpu) == 256 ? contains([512, 1024, 2048], coalesce(s.memory_mib, var.capture.memory_mib)) :
      contains([512, 1024, 2048, 4096], coalesce(s.cpu, var.capture.cpu)) &&
      coalesce(s.memory_mib, var.capture.memory_mib) % 1024 == 0 &&
      coalesce(s.memory_mib, var.capture.memory_mib) >= coalesce(s.cpu, var.capture.cpu) * 2 &&
      coalesce(s.memory_mib, var.capture.memory_mib) <= min(coalesce(s.cpu, var.capture.cpu) * 8, 30720)
    )])
    error_message = "sources[]: cpu must be 256, 512, 1024, 2048 or 4096 and memory_mib a Fargate size for it (256: 512, 1024, 2048; 512: 1024-4096; 1024: 2048-8192; 2048: 4096-16384; 4096: 8192-30720; in steps of 1024)."
  }
  validation {
    condition = alltrue([for s in var.sources : (
      coalesce(s.flush_max_bytes, var.capture.flush_max_bytes) >= 65536 && coalesce(s.flush_max_bytes, var.capture.flush_max_bytes) <= 1073741824 &&
      coalesce(s.flush_interval_ms, var.capture.flush_interval_ms) >= 100 && coalesce(s.flush_interval_ms, var.capture.flush_interval_ms) <= 3600000 &&
      coalesce(s.lag_alarm_seconds, var.alarms.replication_lag_seconds) >= 1 && coalesce(s.lag_alarm_seconds, var.alarms.replication_lag_seconds) <= 604800
    )])
    error_message = "sources[]: flush_max_bytes must be between 65536 and 1073741824, flush_interval_ms between 100 and 3600000, lag_alarm_seconds between 1 and 604800."
  }
}

variable "tags" {
  description = "Tags added to every resource, besides project = pg-cdc-s3."
  type        = map(string)
  default     = {}
  nullable    = false
}
