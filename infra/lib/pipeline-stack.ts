// The whole pipeline in one stack: the bucket, the DynamoDB ledger, the notification queues, one
// capture service per source database, the compactor Lambda, the Glue database and Athena
// workgroup (unless catalog.enabled is false), the dashboard and the alarms.
// Cost at rest is part of the contract: no NAT gateway, no interface endpoint, no KMS key, no
// Container Insights; see DEPLOY.md for the figures.

import { Annotations, CfnOutput, Duration, IgnoreMode, RemovalPolicy, Stack, StackProps, Tags } from 'aws-cdk-lib';
import * as dynamodb from 'aws-cdk-lib/aws-dynamodb';
import * as ec2 from 'aws-cdk-lib/aws-ec2';
import * as ecrAssets from 'aws-cdk-lib/aws-ecr-assets';
import * as ecs from 'aws-cdk-lib/aws-ecs';
import * as events from 'aws-cdk-lib/aws-events';
import * as targets from 'aws-cdk-lib/aws-events-targets';
import * as iam from 'aws-cdk-lib/aws-iam';
import * as lambda from 'aws-cdk-lib/aws-lambda';
import { SqsEventSource } from 'aws-cdk-lib/aws-lambda-event-sources';
import * as logs from 'aws-cdk-lib/aws-logs';
import * as s3 from 'aws-cdk-lib/aws-s3';
import * as sqs from 'aws-cdk-lib/aws-sqs';
import { NagSuppressions } from 'cdk-nag';
import { Construct } from 'constructs';
import { CaptureService, LEDGER_ACTIONS } from './capture';
import { Catalog } from './catalog';
import { ConfigError, PipelineConfig, REPO_ROOT, compactorAssetPath, underBase } from './config';
import { MetricCatalogue, loadMetrics } from './metrics';
import { Monitoring } from './monitoring';

/** The capture image's Dockerfile, relative to the repository root (the build context). */
export const CAPTURE_DOCKERFILE = 'capture/Dockerfile';

/**
 * Never part of the image's build context, in addition to the repository's .dockerignore (an
 * allowlist of the Rust workspace): build output, virtualenvs, node_modules, CDK output, git and
 * local state. Keeps staging the context at synth time small and fast, and the asset hash
 * independent of anything but the Rust sources.
 */
export const CONTEXT_EXCLUDES = [
  'target',
  '**/target',
  '.venv',
  '.local',
  '.git',
  'infra',
  '**/node_modules',
  '**/cdk.out',
];

/** CloudWatch Logs' accepted retention periods, in days. */
const LOG_RETENTION_DAYS = [1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653];

export interface PipelineStackProps extends StackProps {
  config: PipelineConfig;
  /** The metric catalogue; default: cdc-contract/metrics.json. */
  metrics?: MetricCatalogue;
}

export class PipelineStack extends Stack {
  readonly bucket: s3.Bucket;
  readonly ledger: dynamodb.Table;
  readonly notifyQueue: sqs.Queue;
  readonly notifyDeadLetterQueue: sqs.Queue;
  readonly deadLetterNotices: sqs.Queue;
  readonly compactor: lambda.Function;
  readonly captures: CaptureService[] = [];
  /** The Glue database and the Athena workgroup; absent with catalog.enabled false. */
  readonly catalog?: Catalog;
  readonly monitoring: Monitoring;

  constructor(scope: Construct, id: string, props: PipelineStackProps) {
    super(scope, id, props);
    const config = props.config;
    const catalogue = props.metrics ?? loadMetrics();
    const base = config.basePath;
    const removalPolicy = config.removalPolicy === 'retain' ? RemovalPolicy.RETAIN : RemovalPolicy.DESTROY;
    if (!LOG_RETENTION_DAYS.includes(config.logRetentionDays)) {
      throw new ConfigError('logRetentionDays', `must be one of ${LOG_RETENTION_DAYS.join(', ')}`);
    }
    const logRetention = config.logRetentionDays as logs.RetentionDays;
    const stagingPrefix = underBase(base, '_staging/');
    const deadLetterPrefix = underBase(base, '_dead_letter/');
    Tags.of(this).add('project', 'pg-cdc-s3');

    // ---- Storage ------------------------------------------------------------------------------
    this.bucket = new s3.Bucket(this, 'Bucket', {
      bucketName: config.bucketName,
      encryption: s3.BucketEncryption.S3_MANAGED,
      blockPublicAccess: s3.BlockPublicAccess.BLOCK_ALL,
      objectOwnership: s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
      enforceSSL: true,
      minimumTLSVersion: 1.2,
      versioned: config.versioned,
      removalPolicy,
      // `cdk destroy` with removalPolicy destroy empties the bucket first (a non-empty bucket
      // cannot be deleted, and the stack would fail to delete).
      autoDeleteObjects: removalPolicy === RemovalPolicy.DESTROY ? true : undefined,
      lifecycleRules: [
        {
          // Only what the compactor marked: a staging object is tagged compacted=true once the
          // ledger records its batch as compacted. Nothing else ever expires.
          id: 'ExpireCompactedStaging',
          prefix: stagingPrefix,
          tagFilters: { compacted: 'true' },
          expiration: Duration.days(config.stagingExpirationDays),
          noncurrentVersionExpiration: config.versioned ? Duration.days(1) : undefined,
        },
        {
          // Everything else under staging, after a safe age: orphans of flushes that never
          // committed and batches of retired snapshots are never tagged. The pending-hour alarm
          // fires long before (checked in the configuration), while a pending hour's batches are
          // still there to compact.
          id: 'ExpireAllStaging',
          prefix: stagingPrefix,
          expiration: Duration.days(config.stagingMaxAgeDays),
          noncurrentVersionExpiration: config.versioned ? Duration.days(1) : undefined,
        },
        {
          // Parts of multipart uploads a crashed compactor left behind are invisible but billed.
          id: 'AbortIncompleteMultipartUploads',
          abortIncompleteMultipartUploadAfter: Duration.days(7),
        },
      ],
    });
    NagSuppressions.addResourceSuppressions(this.bucket, [
      {
        id: 'AwsSolutions-S1',
        reason:
          'Server access logs would need a second bucket and cost per request logged; every writer is ' +
          'one of two roles of this stack, and CloudTrail data events can be enabled when an audit needs them.',
      },
    ]);

    this.ledger = new dynamodb.Table(this, 'Ledger', {
      partitionKey: { name: 'pk', type: dynamodb.AttributeType.STRING },
      sortKey: { name: 'sk', type: dynamodb.AttributeType.STRING },
      billingMode: dynamodb.BillingMode.PAY_PER_REQUEST,
      pointInTimeRecoverySpecification: { pointInTimeRecoveryEnabled: true },
      timeToLiveAttribute: 'expires_at',
      deletionProtection: removalPolicy === RemovalPolicy.RETAIN ? true : undefined,
      removalPolicy,
    });

    // ---- Catalog: the Glue database the compactor keeps, the Athena workgroup --------------------
    if (config.catalog.enabled) {
      this.catalog = new Catalog(this, 'Catalog', {
        databaseName: config.catalog.databaseName,
        workGroupName: config.stackName,
        resultsRetentionDays: config.catalog.resultsRetentionDays,
        removalPolicy,
      });
    }

    // ---- Queues -------------------------------------------------------------------------------
    const compactorTimeout = Duration.seconds(config.compactor.timeoutSeconds);
    this.notifyDeadLetterQueue = new sqs.Queue(this, 'NotifyDeadLetterQueue', {
      retentionPeriod: Duration.days(14),
      encryption: sqs.QueueEncryption.SQS_MANAGED,
      enforceSSL: true,
    });
    this.notifyQueue = new sqs.Queue(this, 'NotifyQueue', {
      // AWS: at least six times the function timeout, plus the batching window.
      visibilityTimeout: Duration.seconds(6 * config.compactor.timeoutSeconds + config.compactor.maxBatchingWindowSeconds),
      retentionPeriod: Duration.days(4),
      encryption: sqs.QueueEncryption.SQS_MANAGED,
      enforceSSL: true,
      deadLetterQueue: { queue: this.notifyDeadLetterQueue, maxReceiveCount: config.queue.maxReceiveCount },
    });
    this.deadLetterNotices = new sqs.Queue(this, 'DeadLetterNotices', {
      retentionPeriod: Duration.days(14),
      encryption: sqs.QueueEncryption.SQS_MANAGED,
      enforceSSL: true,
    });
    NagSuppressions.addResourceSuppressions(this.deadLetterNotices, [
      {
        id: 'AwsSolutions-SQS3',
        reason:
          'A terminal queue: the compactor\'s notices of records it moved to the _dead_letter/ prefix, ' +
          'read by people and tools; an alarm fires on any message in it.',
      },
    ]);

    // ---- Network ------------------------------------------------------------------------------
    let vpc: ec2.IVpc;
    let subnets: ec2.SubnetSelection;
    let assignPublicIp: boolean;
    if (config.vpc) {
      const v = config.vpc;
      vpc = ec2.Vpc.fromVpcAttributes(this, 'Vpc', {
        vpcId: v.vpcId,
        availabilityZones: v.availabilityZones,
        publicSubnetIds: v.publicSubnetIds,
        privateSubnetIds: v.privateSubnetIds,
      });
      Annotations.of(vpc).acknowledgeWarning(
        '@aws-cdk/aws-ec2:noSubnetRouteTableId',
        'The stack adds no route to the existing subnets, so it never needs their route tables',
      );
      assignPublicIp = v.publicSubnetIds !== undefined;
      subnets = { subnets: assignPublicIp ? vpc.publicSubnets : vpc.privateSubnets };
    } else {
      const created = new ec2.Vpc(this, 'Vpc', {
        maxAzs: config.maxAzs,
        // No NAT gateway (~$33/month each) and no interface endpoint (~$7/month each per AZ): the
        // tasks sit in public subnets with a public IP and a security group without inbound rules.
        natGateways: 0,
        subnetConfiguration: [{ name: 'public', subnetType: ec2.SubnetType.PUBLIC, cidrMask: 24 }],
        // Nothing uses the default security group; restricting it would add a custom resource Lambda.
        restrictDefaultSecurityGroup: false,
      });
      NagSuppressions.addResourceSuppressions(created, [
        {
          id: 'AwsSolutions-VPC7',
          reason:
            'Flow logs cost per GB ingested; the VPC holds only the capture tasks, which accept no ' +
            'inbound connection. Enable them when a network investigation needs them.',
        },
      ]);
      vpc = created;
      subnets = { subnetType: ec2.SubnetType.PUBLIC };
      assignPublicIp = true;
    }
    const securityGroup = new ec2.SecurityGroup(this, 'CaptureSecurityGroup', {
      vpc,
      description: 'Capture tasks: no inbound rule; outbound to PostgreSQL and the AWS APIs',
      allowAllOutbound: true,
    });

    // ---- Capture: one Fargate service per source database -------------------------------------
    const cluster = new ecs.Cluster(this, 'Cluster', {
      vpc,
      containerInsightsV2: ecs.ContainerInsights.DISABLED,
      enableFargateCapacityProviders: config.capture.spot ? true : undefined,
    });
    NagSuppressions.addResourceSuppressions(cluster, [
      {
        id: 'AwsSolutions-ECS4',
        reason:
          'Container Insights bills per-task custom metrics; the dashboard uses the free ECS service ' +
          'CPU/memory metrics and the capture\'s own lag metric, whose absence raises the capture-down alarm.',
      },
    ]);

    const image = new ecrAssets.DockerImageAsset(this, 'CaptureImage', {
      directory: REPO_ROOT,
      file: CAPTURE_DOCKERFILE,
      platform: ecrAssets.Platform.LINUX_ARM64,
      ignoreMode: IgnoreMode.DOCKER,
      exclude: CONTEXT_EXCLUDES,
    });

    for (const source of config.sources) {
      this.captures.push(
        new CaptureService(this, `Capture-${source.name}`, {
          source,
          stackName: config.stackName,
          basePath: base,
          closeGraceSeconds: config.compactor.closeGraceSeconds,
          cluster,
          image,
          securityGroup,
          subnets,
          assignPublicIp,
          bucket: this.bucket,
          ledger: this.ledger,
          notifyQueue: this.notifyQueue,
          logRetention,
          removalPolicy,
          spot: config.capture.spot,
        }),
      );
    }

    // ---- Compactor ----------------------------------------------------------------------------
    const compactorLogs = new logs.LogGroup(this, 'CompactorLogs', { retention: logRetention, removalPolicy });
    // An own role instead of the AWSLambdaBasicExecutionRole managed policy, which may write any
    // log group.
    const compactorRole = new iam.Role(this, 'CompactorRole', {
      assumedBy: new iam.ServicePrincipal('lambda.amazonaws.com'),
      description: 'The compactor Lambda: staging and final objects, the ledger, dead-letter notices',
    });
    compactorRole.addToPrincipalPolicy(
      new iam.PolicyStatement({
        sid: 'Logs',
        actions: ['logs:CreateLogStream', 'logs:PutLogEvents'],
        resources: [compactorLogs.logGroupArn],
      }),
    );
    compactorRole.addToPrincipalPolicy(
      new iam.PolicyStatement({
        // Read micro-batches, mark them compacted (the lifecycle rule expires them), delete retired ones.
        sid: 'StagingObjects',
        actions: ['s3:GetObject', 's3:DeleteObject', 's3:PutObjectTagging'],
        resources: [this.bucket.arnForObjects(`${stagingPrefix}*`)],
      }),
    );
    compactorRole.addToPrincipalPolicy(
      new iam.PolicyStatement({
        // Final files and manifests ({base}/{schema.table}/{format}/...), whose tables are not known
        // at deploy time, and dead letters. Multipart uploads need AbortMultipartUpload to clean up.
        sid: 'FinalObjects',
        actions: ['s3:PutObject', 's3:GetObject', 's3:DeleteObject', 's3:AbortMultipartUpload'],
        resources: [this.bucket.arnForObjects(underBase(base, '*')), this.bucket.arnForObjects(`${deadLetterPrefix}*`)],
      }),
    );
    compactorRole.addToPrincipalPolicy(
      new iam.PolicyStatement({
        // FinalObjects covers the whole base path, staging included: the compactor never writes a
        // staged batch (it reads, tags and deletes them), so nothing it does can overwrite one.
        sid: 'NoStagingWrites',
        effect: iam.Effect.DENY,
        actions: ['s3:PutObject', 's3:AbortMultipartUpload'],
        resources: [this.bucket.arnForObjects(`${stagingPrefix}*`)],
      }),
    );
    compactorRole.addToPrincipalPolicy(
      new iam.PolicyStatement({
        // HeadBucket (the start-up check) and listing an hour's prefix for parts no attempt recorded.
        // No s3:prefix condition: S3 authorises HeadBucket as s3:ListBucket without any prefix in
        // the request, so a condition would either refuse it or (IfExists) still allow any listing.
        sid: 'ListBucket',
        actions: ['s3:ListBucket'],
        resources: [this.bucket.bucketArn],
      }),
    );
    compactorRole.addToPrincipalPolicy(
      new iam.PolicyStatement({ sid: 'Ledger', actions: LEDGER_ACTIONS, resources: [this.ledger.tableArn] }),
    );
    compactorRole.addToPrincipalPolicy(
      new iam.PolicyStatement({
        sid: 'DeadLetterNotices',
        actions: ['sqs:SendMessage'],
        resources: [this.deadLetterNotices.queueArn],
      }),
    );
    // Without the catalog, no Glue permission at all (and no GLUE_DATABASE: no catalog call).
    if (this.catalog) compactorRole.addToPrincipalPolicy(this.catalog.compactorStatement());

    const environment: Record<string, string> = {
      S3_BUCKET_NAME: this.bucket.bucketName,
      S3_BASE_PATH: base,
      LEDGER_TABLE: this.ledger.tableName,
      OUTPUT_FORMATS: config.compactor.outputFormats,
      CLOSE_GRACE_SECONDS: String(config.compactor.closeGraceSeconds),
      PART_MAX_BYTES: String(config.compactor.partMaxBytes),
      PARQUET_COMPRESSION: config.compactor.parquetCompression,
      AVRO_CODEC: config.compactor.avroCodec,
      JSONL_COMPRESSION: config.compactor.jsonlCompression,
      DEAD_LETTER_QUEUE_URL: this.deadLetterNotices.queueUrl,
      // An attempt that lost its claim lives at most the function's timeout: past it, no late
      // upload can land, and the hour is listed once more for strays.
      STRAGGLER_WINDOW_SECONDS: String(config.compactor.timeoutSeconds + 60),
      OPEN_HOUR_COMPACT_MINUTES: String(config.compactor.openHourCompactMinutes),
      LOG_FORMAT: 'json',
    };
    if (config.compactor.slotFilter) environment.CDC_SLOT_NAME = config.compactor.slotFilter;
    // A reference to the database: the function is created after it, so no run finds it missing.
    if (this.catalog) environment.GLUE_DATABASE = this.catalog.databaseName;

    this.compactor = new lambda.Function(this, 'Compactor', {
      description: 'Rolls staging micro-batches into hour-partitioned JSONL.gz and Parquet files',
      runtime: lambda.Runtime.PROVIDED_AL2023,
      architecture: lambda.Architecture.ARM_64,
      handler: 'bootstrap',
      code: lambda.Code.fromAsset(compactorAssetPath(config)),
      memorySize: config.compactor.memoryMiB,
      timeout: compactorTimeout,
      reservedConcurrentExecutions: config.compactor.reservedConcurrency,
      role: compactorRole,
      logGroup: compactorLogs,
      environment,
      // Scheduled sweeps are invoked asynchronously: a failed or stale one is not retried, the next
      // sweep does the same work.
      retryAttempts: 0,
      maxEventAge: Duration.hours(1),
    });

    this.compactor.addEventSource(
      new SqsEventSource(this.notifyQueue, {
        batchSize: config.compactor.batchSize,
        maxBatchingWindow:
          config.compactor.maxBatchingWindowSeconds > 0
            ? Duration.seconds(config.compactor.maxBatchingWindowSeconds)
            : undefined,
        reportBatchItemFailures: true,
        // Never more pollers than the function may run: throttled batches would count as receives
        // and end up in the dead-letter queue.
        maxConcurrency: config.compactor.maxConcurrency,
      }),
    );

    new events.Rule(this, 'SweepSchedule', {
      description: 'Compactor sweep: compacts every closed hour the ledger holds as pending',
      schedule: events.Schedule.rate(Duration.minutes(config.compactor.sweepMinutes)),
      targets: [
        new targets.LambdaFunction(this.compactor, {
          event: events.RuleTargetInput.fromObject({ action: 'sweep' }),
          retryAttempts: 2,
          maxEventAge: Duration.minutes(Math.max(1, config.compactor.sweepMinutes)),
        }),
      ],
    });

    NagSuppressions.addResourceSuppressions(
      compactorRole,
      [
        {
          id: 'AwsSolutions-IAM5',
          reason:
            'Object keys under the staging, final and dead-letter prefixes are derived from table names, ' +
            'hours and LSNs at run time, so each grant ends in a prefix wildcard on this bucket only.',
          appliesTo: [{ regex: '/^Resource::<.+\\.Arn>\\/(.+\\/)?(_staging\\/|_dead_letter\\/)?\\*$/' }],
        },
        {
          id: 'AwsSolutions-IAM5',
          reason: 'Log stream ARNs of the compactor\'s own log group end in a wildcard.',
          appliesTo: [{ regex: '/^Resource::<CompactorLogs.+\\.Arn>(:\\*)?$/' }],
        },
        ...(this.catalog
          ? [
              {
                id: 'AwsSolutions-IAM5',
                reason:
                  'The compactor names a Glue table after each captured table at run time; the grant is ' +
                  'GetTable, CreateTable and UpdateTable on the tables of this stack\'s database only.',
                appliesTo: [{ regex: `/^Resource::arn:.+:glue:.+:table\\/${config.catalog.databaseName}\\/\\*$/` }],
              },
            ]
          : []),
      ],
      true,
    );

    // ---- Monitoring ---------------------------------------------------------------------------
    this.monitoring = new Monitoring(this, 'Monitoring', {
      config,
      catalogue,
      services: this.captures.map((c, i) => ({ source: config.sources[i], service: c.service })),
      compactor: this.compactor,
      notifyQueue: this.notifyQueue,
      notifyDeadLetterQueue: this.notifyDeadLetterQueue,
      deadLetterNotices: this.deadLetterNotices,
    });

    // ---- Outputs ------------------------------------------------------------------------------
    new CfnOutput(this, 'BucketName', { value: this.bucket.bucketName });
    new CfnOutput(this, 'BasePath', { value: base === '' ? '(bucket root)' : base });
    new CfnOutput(this, 'LedgerTableName', { value: this.ledger.tableName });
    new CfnOutput(this, 'NotifyQueueUrl', { value: this.notifyQueue.queueUrl });
    new CfnOutput(this, 'NotifyDeadLetterQueueUrl', { value: this.notifyDeadLetterQueue.queueUrl });
    new CfnOutput(this, 'DeadLetterNoticesQueueUrl', { value: this.deadLetterNotices.queueUrl });
    new CfnOutput(this, 'CompactorFunctionName', { value: this.compactor.functionName });
    new CfnOutput(this, 'CaptureSecurityGroupId', {
      value: securityGroup.securityGroupId,
      description: 'Allow inbound PostgreSQL from this group on the source databases\' security groups',
    });
    new CfnOutput(this, 'DashboardName', { value: this.monitoring.dashboard.dashboardName });
    new CfnOutput(this, 'ClusterName', {
      value: cluster.clusterName,
      description: 'The ECS cluster of the capture services (aws ecs update-service --cluster)',
    });
    new CfnOutput(this, 'CompactorLogGroupName', { value: compactorLogs.logGroupName });
    if (this.catalog) {
      new CfnOutput(this, 'GlueDatabaseName', {
        value: this.catalog.databaseName,
        description: 'The Glue database the compactor keeps one table per captured table in (GLUE_DATABASE)',
      });
      new CfnOutput(this, 'AthenaWorkGroupName', {
        value: this.catalog.workGroup.ref,
        description: 'Query in this workgroup (aws athena start-query-execution --work-group)',
      });
      new CfnOutput(this, 'AthenaResultsBucketName', { value: this.catalog.resultsBucket.bucketName });
    }
    this.captures.forEach((c, i) => {
      const name = config.sources[i].name.replace(/[^A-Za-z0-9]/g, '');
      new CfnOutput(this, `CaptureService${name}`, { value: c.service.serviceName });
      new CfnOutput(this, `CaptureLogGroup${name}`, { value: c.logGroup.logGroupName });
      if (c.generatedSecret) {
        new CfnOutput(this, `PasswordSecret${name}`, {
          value: c.passwordSecret.secretArn,
          description: `Placeholder secret: put the password of ${config.sources[i].user} here`,
        });
      }
    });
  }
}
