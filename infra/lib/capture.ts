// One capture service: an always-on ECS Fargate task streaming one source database's replication
// slot into the staging prefix, the ledger and the notification queue.

import { Duration, RemovalPolicy, Stack } from 'aws-cdk-lib';
import * as dynamodb from 'aws-cdk-lib/aws-dynamodb';
import * as ec2 from 'aws-cdk-lib/aws-ec2';
import * as ecrAssets from 'aws-cdk-lib/aws-ecr-assets';
import * as ecs from 'aws-cdk-lib/aws-ecs';
import * as iam from 'aws-cdk-lib/aws-iam';
import * as kms from 'aws-cdk-lib/aws-kms';
import * as logs from 'aws-cdk-lib/aws-logs';
import * as s3 from 'aws-cdk-lib/aws-s3';
import * as secretsmanager from 'aws-cdk-lib/aws-secretsmanager';
import * as sqs from 'aws-cdk-lib/aws-sqs';
import { NagSuppressions } from 'cdk-nag';
import { Construct } from 'constructs';
import { SourceConfig, underBase } from './config';

/** The ledger actions both binaries use. TransactWriteItems is no IAM action of its own: DynamoDB
 * authorises each item of a transaction through PutItem, UpdateItem, DeleteItem or
 * ConditionCheckItem. DescribeTable is the start-up check; BatchGetItem the compactor's plan
 * reading flush records. */
export const LEDGER_ACTIONS = [
  'dynamodb:DescribeTable',
  'dynamodb:GetItem',
  'dynamodb:PutItem',
  'dynamodb:UpdateItem',
  'dynamodb:DeleteItem',
  'dynamodb:Query',
  'dynamodb:BatchWriteItem',
  'dynamodb:BatchGetItem',
  'dynamodb:ConditionCheckItem',
];

/** The port the capture's /healthz listens on (HEALTH_PORT); the health check probes it. */
export const HEALTH_PORT = 8080;

export interface CaptureServiceProps {
  source: SourceConfig;
  stackName: string;
  basePath: string;
  closeGraceSeconds: number;
  cluster: ecs.ICluster;
  image: ecrAssets.DockerImageAsset;
  securityGroup: ec2.ISecurityGroup;
  subnets: ec2.SubnetSelection;
  assignPublicIp: boolean;
  bucket: s3.IBucket;
  ledger: dynamodb.ITable;
  notifyQueue: sqs.IQueue;
  logRetention: logs.RetentionDays;
  removalPolicy: RemovalPolicy;
  /** Fargate Spot instead of on-demand Fargate. */
  spot: boolean;
}

export class CaptureService extends Construct {
  readonly service: ecs.FargateService;
  readonly taskDefinition: ecs.FargateTaskDefinition;
  readonly logGroup: logs.LogGroup;
  readonly passwordSecret: secretsmanager.ISecret;
  /** True when the stack generated a placeholder secret (no existing one was configured). */
  readonly generatedSecret: boolean;

  constructor(scope: Construct, id: string, props: CaptureServiceProps) {
    super(scope, id);
    const s = props.source;

    this.logGroup = new logs.LogGroup(this, 'Logs', {
      retention: props.logRetention,
      removalPolicy: props.removalPolicy,
    });

    this.generatedSecret = !s.passwordSecretArn && !s.passwordSecretName;
    if (s.passwordSecretArn) {
      this.passwordSecret = secretsmanager.Secret.fromSecretCompleteArn(this, 'Password', s.passwordSecretArn);
    } else if (s.passwordSecretName) {
      this.passwordSecret = secretsmanager.Secret.fromSecretNameV2(this, 'Password', s.passwordSecretName);
    } else {
      const secret = new secretsmanager.Secret(this, 'Password', {
        description: `Password of PostgreSQL user ${s.user} for the ${s.name} capture (placeholder: set it to the real password)`,
        generateSecretString: { passwordLength: 32, excludePunctuation: true },
        removalPolicy: props.removalPolicy,
      });
      NagSuppressions.addResourceSuppressions(secret, [
        {
          id: 'AwsSolutions-SMG4',
          reason:
            'The password belongs to a PostgreSQL role the database owner manages; rotating it here would ' +
            'not change it in the database. Rotate it in the database, then update this secret.',
        },
      ]);
      this.passwordSecret = secret;
    }

    this.taskDefinition = new ecs.FargateTaskDefinition(this, 'Task', {
      family: `${props.stackName}-capture-${s.name}`,
      cpu: s.cpu,
      memoryLimitMiB: s.memoryMiB,
      runtimePlatform: {
        cpuArchitecture: ecs.CpuArchitecture.ARM64,
        operatingSystemFamily: ecs.OperatingSystemFamily.LINUX,
      },
    });

    const environment: Record<string, string> = {
      POSTGRES_HOST: s.host,
      POSTGRES_PORT: String(s.port),
      POSTGRES_DATABASE: s.database,
      POSTGRES_USER: s.user,
      CDC_SLOT_NAME: s.slotName,
      CDC_PUBLICATION: s.publication,
      PGSSLMODE: s.sslMode,
      S3_BUCKET_NAME: props.bucket.bucketName,
      S3_BASE_PATH: props.basePath,
      LEDGER_TABLE: props.ledger.tableName,
      NOTIFY_QUEUE_URL: props.notifyQueue.queueUrl,
      FLUSH_MAX_BYTES: String(s.flushMaxBytes),
      FLUSH_INTERVAL_MS: String(s.flushIntervalMs),
      // The capture notifies when its checkpoint passes an hour's end plus this grace: keep it
      // equal to the compactor's.
      CLOSE_GRACE_SECONDS: String(props.closeGraceSeconds),
      AWS_REGION: Stack.of(this).region,
      LOG_FORMAT: 'json',
      HEALTH_PORT: String(HEALTH_PORT),
      METRICS_PER_TABLE: String(s.metricsPerTable),
    };
    if (s.tables.length > 0) environment.CDC_TABLES = s.tables.join(',');
    if (s.sslRootCert) environment.PGSSLROOTCERT = s.sslRootCert;

    this.taskDefinition.addContainer('capture', {
      image: ecs.ContainerImage.fromDockerImageAsset(props.image),
      essential: true,
      environment,
      secrets: {
        POSTGRES_PASSWORD: ecs.Secret.fromSecretsManager(this.passwordSecret, s.passwordSecretField),
      },
      logging: ecs.LogDrivers.awsLogs({ streamPrefix: 'capture', logGroup: this.logGroup }),
      healthCheck: {
        // The binary probes its own http://127.0.0.1:HEALTH_PORT/healthz (the image has no shell or curl).
        command: ['CMD', '/usr/local/bin/capture', 'healthcheck'],
        interval: Duration.seconds(30),
        timeout: Duration.seconds(5),
        retries: 3,
        startPeriod: Duration.seconds(60),
      },
      // On SIGTERM the capture finishes its flush and stops; give it Fargate's maximum.
      stopTimeout: Duration.seconds(120),
      // It writes nothing locally outside LOCAL TEST MODE.
      readonlyRootFilesystem: true,
    });

    if (s.passwordSecretKmsKeyArn) {
      kms.Key.fromKeyArn(this, 'PasswordKey', s.passwordSecretKmsKeyArn).grantDecrypt(
        this.taskDefinition.obtainExecutionRole(),
      );
    }

    // Least privilege: the task role writes staging objects only, uses the ledger and notifies.
    const staging = underBase(props.basePath, '_staging/');
    const role = this.taskDefinition.taskRole;
    role.addToPrincipalPolicy(
      new iam.PolicyStatement({
        sid: 'PutStagingObjects',
        actions: ['s3:PutObject'],
        resources: [props.bucket.arnForObjects(`${staging}*`)],
      }),
    );
    role.addToPrincipalPolicy(
      new iam.PolicyStatement({
        // The start-up check (HeadBucket) is authorised as s3:ListBucket.
        sid: 'CheckBucket',
        actions: ['s3:ListBucket'],
        resources: [props.bucket.bucketArn],
      }),
    );
    role.addToPrincipalPolicy(
      new iam.PolicyStatement({ sid: 'Ledger', actions: LEDGER_ACTIONS, resources: [props.ledger.tableArn] }),
    );
    role.addToPrincipalPolicy(
      new iam.PolicyStatement({ sid: 'Notify', actions: ['sqs:SendMessage'], resources: [props.notifyQueue.queueArn] }),
    );

    this.service = new ecs.FargateService(this, 'Service', {
      cluster: props.cluster,
      taskDefinition: this.taskDefinition,
      // One writer per slot: never two tasks at once (the lease fences one out anyway), so a
      // deployment stops the old task before it starts the new one.
      desiredCount: 1,
      minHealthyPercent: 0,
      maxHealthyPercent: 100,
      circuitBreaker: { enable: true, rollback: true },
      assignPublicIp: props.assignPublicIp,
      vpcSubnets: props.subnets,
      securityGroups: [props.securityGroup],
      platformVersion: ecs.FargatePlatformVersion.LATEST,
      // Spot: a reclaimed task gets SIGTERM two minutes ahead, records what it buffered and
      // releases the lease; the replacement resumes from the ledger. Nothing is lost, the
      // stream waits while no Spot capacity is free.
      capacityProviderStrategies: props.spot ? [{ capacityProvider: 'FARGATE_SPOT', weight: 1 }] : undefined,
      enableExecuteCommand: false,
      propagateTags: ecs.PropagatedTagSource.SERVICE,
    });

    NagSuppressions.addResourceSuppressions(
      this.taskDefinition,
      [
        {
          id: 'AwsSolutions-ECS2',
          reason:
            'The environment holds only non-secret settings (host, slot, bucket, queue URL, flush sizes); ' +
            'the password comes from Secrets Manager through the container secrets.',
        },
        {
          id: 'AwsSolutions-IAM5',
          reason:
            'Execution role: ecr:GetAuthorizationToken has no resource-level permissions, and the log ' +
            'stream ARNs of the task log group end in a wildcard.',
          appliesTo: ['Resource::*'],
        },
        {
          id: 'AwsSolutions-IAM5',
          reason:
            'Task role: the capture writes staging micro-batches under {base}/_staging/ with keys it ' +
            'derives from their content (table, hour, LSN range), so the prefix must end in a wildcard.',
          appliesTo: [{ regex: '/^Resource::<.+\\.Arn>\\/(.+\\/)?_staging\\/\\*$/' }],
        },
        ...(this.generatedSecret || s.passwordSecretArn
          ? []
          : [
              {
                id: 'AwsSolutions-IAM5',
                reason:
                  'A secret given by name has a 6-character suffix CloudFormation cannot know, so its ARN ' +
                  'ends in -??????; set passwordSecretArn to grant the exact ARN.',
                appliesTo: [{ regex: '/^Resource::arn:.*:secret:.*-\\?\\?\\?\\?\\?\\?$/' }],
              },
            ]),
      ],
      true,
    );
  }
}
