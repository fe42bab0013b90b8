// The synthesized template of config.example.json (two source databases): every resource and the
// settings the design depends on.

import assert from 'node:assert/strict';
import { before, describe, it } from 'node:test';
import { Match } from 'aws-cdk-lib/assertions';
import { containerEnv, exampleConfig, logicalId, render, synth, Synthesized } from './helpers';

describe('config.example.json', () => {
  let s: Synthesized;
  before(() => {
    s = synth('example', exampleConfig());
  });

  describe('bucket', () => {
    it('is encrypted, blocks public access, has no versioning by default', () => {
      // The data bucket and the Athena results bucket (catalog.test.ts).
      s.template.resourceCountIs('AWS::S3::Bucket', 2);
      const bucket = s.json.Resources[logicalId(s.json, 'AWS::S3::Bucket', 'Bucket')].Properties;
      assert.equal(bucket.VersioningConfiguration, undefined);
      s.template.hasResourceProperties('AWS::S3::Bucket', {
        BucketEncryption: {
          ServerSideEncryptionConfiguration: [{ ServerSideEncryptionByDefault: { SSEAlgorithm: 'AES256' } }],
        },
        PublicAccessBlockConfiguration: {
          BlockPublicAcls: true,
          BlockPublicPolicy: true,
          IgnorePublicAcls: true,
          RestrictPublicBuckets: true,
        },
        VersioningConfiguration: Match.absent(),
      });
    });

    it('denies requests without TLS', () => {
      s.template.hasResourceProperties('AWS::S3::BucketPolicy', {
        PolicyDocument: {
          Statement: Match.arrayWith([
            Match.objectLike({
              Effect: 'Deny',
              Principal: { AWS: '*' },
              Action: 's3:*',
              Condition: { Bool: { 'aws:SecureTransport': 'false' } },
            }),
          ]),
        },
      });
    });

    it('expires only staging: compacted objects soon, everything else after a safe age', () => {
      const bucket = s.json.Resources[logicalId(s.json, 'AWS::S3::Bucket', 'Bucket')];
      const rules: any[] = bucket.Properties.LifecycleConfiguration.Rules;
      const expiring = rules.filter((r) => r.ExpirationInDays !== undefined || r.ExpirationDate !== undefined);
      assert.equal(expiring.length, 2);
      for (const r of expiring) {
        assert.equal(r.Prefix, 'cdc/_staging/');
        assert.equal(r.Status, 'Enabled');
      }
      const [tagged, all] = expiring;
      assert.deepEqual(tagged.TagFilters, [{ Key: 'compacted', Value: 'true' }]);
      assert.equal(tagged.ExpirationInDays, 1);
      // Orphans and retired snapshots' batches are never tagged: they expire after 30 days, and
      // the pending-hour alarm (2 hours) fires long before a pending hour's batches could.
      assert.equal(all.TagFilters, undefined);
      assert.equal(all.ExpirationInDays, 30);
      const alarm = Object.values<any>(s.json.Resources).find(
        (r) => r.Type === 'AWS::CloudWatch::Alarm' && r.Properties.MetricName === 'OldestPendingHourAge',
      );
      assert.ok(alarm, 'an OldestPendingHourAge alarm');
      assert.ok(alarm.Properties.Threshold * 4 <= all.ExpirationInDays * 86400);
      for (const r of rules) {
        assert.equal(r.NoncurrentVersionExpiration, undefined);
        assert.equal(r.Transitions, undefined);
        assert.equal(r.ExpiredObjectDeleteMarker, undefined);
      }
    });
  });

  it('ledger: pk/sk strings, on demand, point-in-time recovery, TTL on expires_at', () => {
    s.template.resourceCountIs('AWS::DynamoDB::Table', 1);
    s.template.hasResourceProperties('AWS::DynamoDB::Table', {
      KeySchema: [
        { AttributeName: 'pk', KeyType: 'HASH' },
        { AttributeName: 'sk', KeyType: 'RANGE' },
      ],
      AttributeDefinitions: Match.arrayWith([
        { AttributeName: 'pk', AttributeType: 'S' },
        { AttributeName: 'sk', AttributeType: 'S' },
      ]),
      BillingMode: 'PAY_PER_REQUEST',
      PointInTimeRecoverySpecification: { PointInTimeRecoveryEnabled: true },
      TimeToLiveSpecification: { AttributeName: 'expires_at', Enabled: true },
    });
    s.template.hasResource('AWS::DynamoDB::Table', { DeletionPolicy: 'Retain', UpdateReplacePolicy: 'Retain' });
    s.template.hasResourceProperties('AWS::DynamoDB::Table', { DeletionProtectionEnabled: true });
    s.template.hasResource('AWS::S3::Bucket', { DeletionPolicy: 'Retain' });
  });

  describe('queues', () => {
    it('notification queue: dead-letter queue after 5 receives, visibility >= 6x the Lambda timeout', () => {
      s.template.resourceCountIs('AWS::SQS::Queue', 3);
      const dlq = logicalId(s.json, 'AWS::SQS::Queue', 'NotifyDeadLetterQueue');
      const q = s.json.Resources[logicalId(s.json, 'AWS::SQS::Queue', 'NotifyQueue')].Properties;
      assert.deepEqual(q.RedrivePolicy, { deadLetterTargetArn: { 'Fn::GetAtt': [dlq, 'Arn'] }, maxReceiveCount: 5 });
      const fn = s.json.Resources[logicalId(s.json, 'AWS::Lambda::Function', 'Compactor')].Properties;
      assert.equal(fn.Timeout, 300);
      assert.ok(q.VisibilityTimeout >= 6 * fn.Timeout, `visibility ${q.VisibilityTimeout}`);
      assert.equal(q.SqsManagedSseEnabled, true);
    });

    it('every queue is encrypted and refuses requests without TLS', () => {
      for (const r of Object.values<any>(s.json.Resources).filter((r) => r.Type === 'AWS::SQS::Queue')) {
        assert.equal(r.Properties.SqsManagedSseEnabled, true);
      }
      s.template.resourcePropertiesCountIs(
        'AWS::SQS::QueuePolicy',
        {
          PolicyDocument: {
            Statement: Match.arrayWith([
              Match.objectLike({ Effect: 'Deny', Condition: { Bool: { 'aws:SecureTransport': 'false' } } }),
            ]),
          },
        },
        3,
      );
    });

    it('dead-letter notices queue is passed to the compactor', () => {
      const notices = logicalId(s.json, 'AWS::SQS::Queue', 'DeadLetterNotices');
      s.template.hasResourceProperties('AWS::Lambda::Function', {
        Environment: { Variables: Match.objectLike({ DEAD_LETTER_QUEUE_URL: { Ref: notices } }) },
      });
    });
  });

  describe('network', () => {
    it('creates no NAT gateway, no VPC endpoint, public subnets only', () => {
      s.template.resourceCountIs('AWS::EC2::NatGateway', 0);
      s.template.resourceCountIs('AWS::EC2::VPCEndpoint', 0);
      s.template.resourceCountIs('AWS::EC2::EIP', 0);
      s.template.resourceCountIs('AWS::EC2::VPC', 1);
      s.template.resourceCountIs('AWS::EC2::InternetGateway', 1);
      const subnets = Object.values<any>(s.json.Resources).filter((r) => r.Type === 'AWS::EC2::Subnet');
      assert.equal(subnets.length, 2);
      for (const sn of subnets) assert.equal(sn.Properties.MapPublicIpOnLaunch, true);
      for (const rt of Object.values<any>(s.json.Resources).filter((r) => r.Type === 'AWS::EC2::Route')) {
        assert.ok(rt.Properties.GatewayId, 'every route goes to the internet gateway');
      }
    });

    it('the capture security group has no inbound rule', () => {
      s.template.resourceCountIs('AWS::EC2::SecurityGroup', 1);
      s.template.resourceCountIs('AWS::EC2::SecurityGroupIngress', 0);
      s.template.hasResourceProperties('AWS::EC2::SecurityGroup', { SecurityGroupIngress: Match.absent() });
    });
  });

  describe('capture services', () => {
    it('one service per source database', () => {
      s.template.resourceCountIs('AWS::ECS::Service', 2);
      s.template.resourceCountIs('AWS::ECS::TaskDefinition', 2);
      s.template.resourceCountIs('AWS::ECS::Cluster', 1);
    });

    it('never two tasks at once, circuit breaker with rollback, public IP', () => {
      const services = Object.values<any>(s.json.Resources).filter((r) => r.Type === 'AWS::ECS::Service');
      for (const svc of services) {
        const p = svc.Properties;
        assert.equal(p.DesiredCount, 1);
        assert.equal(p.LaunchType, 'FARGATE');
        assert.deepEqual(p.DeploymentConfiguration, {
          DeploymentCircuitBreaker: { Enable: true, Rollback: true },
          MaximumPercent: 100,
          MinimumHealthyPercent: 0,
        });
        assert.equal(p.NetworkConfiguration.AwsvpcConfiguration.AssignPublicIp, 'ENABLED');
      }
    });

    it('ARM64 Fargate tasks sized per source (0.25 vCPU / 512 MiB by default)', () => {
      const orders = s.json.Resources[logicalId(s.json, 'AWS::ECS::TaskDefinition', 'Captureorders')].Properties;
      const billing = s.json.Resources[logicalId(s.json, 'AWS::ECS::TaskDefinition', 'Capturebilling')].Properties;
      for (const t of [orders, billing]) {
        assert.deepEqual(t.RuntimePlatform, { CpuArchitecture: 'ARM64', OperatingSystemFamily: 'LINUX' });
        assert.deepEqual(t.RequiresCompatibilities, ['FARGATE']);
        assert.equal(t.NetworkMode, 'awsvpc');
      }
      assert.equal(orders.Cpu, '256');
      assert.equal(orders.Memory, '512');
      assert.equal(billing.Cpu, '512');
      assert.equal(billing.Memory, '1024');
    });

    it('container: health check, password from Secrets Manager, CloudWatch logs with retention', () => {
      const id = logicalId(s.json, 'AWS::ECS::TaskDefinition', 'Captureorders');
      const c = s.json.Resources[id].Properties.ContainerDefinitions[0];
      assert.deepEqual(c.HealthCheck.Command, ['CMD', '/usr/local/bin/capture', 'healthcheck']);
      assert.equal(c.Essential, true);
      assert.deepEqual(c.Secrets, [
        {
          Name: 'POSTGRES_PASSWORD',
          ValueFrom: 'arn:aws:secretsmanager:eu-west-1:123456789012:secret:pgcdc/orders-cdc-user-AbCdEf',
        },
      ]);
      assert.equal(c.LogConfiguration.LogDriver, 'awslogs');
      const logGroup = c.LogConfiguration.Options['awslogs-group'].Ref;
      assert.equal(s.json.Resources[logGroup].Properties.RetentionInDays, 30);
      assert.match(render(c.Image), /container-assets/);
      // A JSON secret given by name: the field is selected in the ARN.
      const billing = s.json.Resources[logicalId(s.json, 'AWS::ECS::TaskDefinition', 'Capturebilling')];
      const secret = billing.Properties.ContainerDefinitions[0].Secrets[0];
      assert.equal(secret.Name, 'POSTGRES_PASSWORD');
      assert.match(render(secret.ValueFrom), /:secret:pgcdc\/billing:password::$/);
    });

    it('environment: every setting the capture reads', () => {
      const env = containerEnv(s.json, logicalId(s.json, 'AWS::ECS::TaskDefinition', 'Captureorders'));
      const bucket = logicalId(s.json, 'AWS::S3::Bucket', 'Bucket');
      const table = logicalId(s.json, 'AWS::DynamoDB::Table', 'Ledger');
      const queue = logicalId(s.json, 'AWS::SQS::Queue', 'NotifyQueue');
      assert.deepEqual(env, {
        POSTGRES_HOST: 'orders.cluster-abcdefghijkl.eu-west-1.rds.amazonaws.com',
        POSTGRES_PORT: '5432',
        POSTGRES_DATABASE: 'orders',
        POSTGRES_USER: 'cdc_user',
        CDC_SLOT_NAME: 'cdc_orders',
        CDC_PUBLICATION: 'cdc_publication',
        CDC_TABLES: 'public.orders,public.order_items',
        PGSSLMODE: 'verify-full',
        PGSSLROOTCERT: '/etc/ssl/rds/global-bundle.pem',
        S3_BUCKET_NAME: `<${bucket}>`,
        S3_BASE_PATH: 'cdc',
        LEDGER_TABLE: `<${table}>`,
        NOTIFY_QUEUE_URL: `<${queue}>`,
        FLUSH_MAX_BYTES: String(16 * 1024 * 1024),
        FLUSH_INTERVAL_MS: '10000',
        CLOSE_GRACE_SECONDS: '300',
        AWS_REGION: '<AWS::Region>',
        LOG_FORMAT: 'json',
        HEALTH_PORT: '8080',
        METRICS_PER_TABLE: 'false',
      });
      const billing = containerEnv(s.json, logicalId(s.json, 'AWS::ECS::TaskDefinition', 'Capturebilling'));
      assert.equal(billing.POSTGRES_PORT, '5433');
      assert.equal(billing.PGSSLMODE, 'require');
      assert.equal(billing.FLUSH_INTERVAL_MS, '30000');
      assert.equal(billing.CDC_TABLES, undefined, 'no tables: every table of the publication');
      assert.equal(billing.PGSSLROOTCERT, undefined);
    });
  });

  describe('compactor', () => {
    it('Lambda on provided.al2023, ARM64, bootstrap handler, limits from the configuration', () => {
      s.template.resourceCountIs('AWS::Lambda::Function', 1);
      s.template.hasResourceProperties('AWS::Lambda::Function', {
        Runtime: 'provided.al2023',
        Architectures: ['arm64'],
        Handler: 'bootstrap',
        MemorySize: 1024,
        Timeout: 300,
        ReservedConcurrentExecutions: Match.absent(),
        LoggingConfig: { LogGroup: { Ref: Match.stringLikeRegexp('^CompactorLogs') } },
      });
    });

    it('environment: every setting the compactor reads, and no reserved variable', () => {
      const fn = s.json.Resources[logicalId(s.json, 'AWS::Lambda::Function', 'Compactor')].Properties;
      const env = Object.fromEntries(Object.entries(fn.Environment.Variables).map(([k, v]) => [k, render(v)]));
      const bucket = logicalId(s.json, 'AWS::S3::Bucket', 'Bucket');
      const table = logicalId(s.json, 'AWS::DynamoDB::Table', 'Ledger');
      const notices = logicalId(s.json, 'AWS::SQS::Queue', 'DeadLetterNotices');
      const database = logicalId(s.json, 'AWS::Glue::Database', 'CatalogDatabase');
      assert.deepEqual(env, {
        S3_BUCKET_NAME: `<${bucket}>`,
        S3_BASE_PATH: 'cdc',
        LEDGER_TABLE: `<${table}>`,
        OUTPUT_FORMATS: 'jsonl,parquet',
        CLOSE_GRACE_SECONDS: '300',
        PART_MAX_BYTES: String(128 * 1024 * 1024),
        PARQUET_COMPRESSION: 'snappy',
        AVRO_CODEC: 'deflate',
        JSONL_COMPRESSION: 'gzip',
        DEAD_LETTER_QUEUE_URL: `<${notices}>`,
        STRAGGLER_WINDOW_SECONDS: '360',
        OPEN_HOUR_COMPACT_MINUTES: '15',
        GLUE_DATABASE: `<${database}>`,
        LOG_FORMAT: 'json',
      });
    });

    it('SQS event source with batching and partial batch failure reporting', () => {
      s.template.resourceCountIs('AWS::Lambda::EventSourceMapping', 1);
      s.template.hasResourceProperties('AWS::Lambda::EventSourceMapping', {
        EventSourceArn: { 'Fn::GetAtt': [logicalId(s.json, 'AWS::SQS::Queue', 'NotifyQueue'), 'Arn'] },
        BatchSize: 10,
        MaximumBatchingWindowInSeconds: 30,
        FunctionResponseTypes: ['ReportBatchItemFailures'],
        ScalingConfig: { MaximumConcurrency: 2 },
      });
    });

    it('a sweep every 5 minutes with the constant input {"action":"sweep"}', () => {
      s.template.resourceCountIs('AWS::Events::Rule', 1);
      s.template.hasResourceProperties('AWS::Events::Rule', {
        ScheduleExpression: 'rate(5 minutes)',
        State: 'ENABLED',
        Targets: [
          Match.objectLike({
            Arn: { 'Fn::GetAtt': [logicalId(s.json, 'AWS::Lambda::Function', 'Compactor'), 'Arn'] },
            Input: JSON.stringify({ action: 'sweep' }),
          }),
        ],
      });
      s.template.hasResourceProperties('AWS::Lambda::Permission', {
        Principal: 'events.amazonaws.com',
        Action: 'lambda:InvokeFunction',
      });
    });
  });

  describe('alarms', () => {
    const alarms = () => Object.values<any>(s.json.Resources).filter((r) => r.Type === 'AWS::CloudWatch::Alarm').map((r) => r.Properties);

    it('replication lag per source, threshold 900 s', () => {
      const lag = alarms().filter((a) => a.MetricName === 'ReplicationLagSeconds' && a.Statistic === 'Maximum');
      assert.equal(lag.length, 2);
      for (const a of lag) {
        assert.equal(a.Threshold, 900);
        assert.equal(a.ComparisonOperator, 'GreaterThanThreshold');
        assert.equal(a.Namespace, 'PgCdc');
      }
      assert.deepEqual(lag.map((a) => a.Dimensions[0].Value).sort(), ['cdc_billing', 'cdc_orders']);
    });

    it('the oldest closed pending hour per source, threshold 7200 s', () => {
      const age = alarms().filter((a) => a.MetricName === 'OldestPendingHourAge');
      assert.equal(age.length, 2);
      for (const a of age) {
        assert.equal(a.Threshold, 7200);
        assert.equal(a.Statistic, 'Maximum');
        assert.equal(a.ComparisonOperator, 'GreaterThanThreshold');
        assert.equal(a.TreatMissingData, 'notBreaching');
      }
      assert.deepEqual(age.map((a) => a.Dimensions[0].Value).sort(), ['cdc_billing', 'cdc_orders']);
    });

    it('a capture that is down: no lag datapoints, missing data breaching', () => {
      const down = alarms().filter((a) => a.MetricName === 'ReplicationLagSeconds' && a.Statistic === 'SampleCount');
      assert.equal(down.length, 2);
      for (const a of down) {
        assert.equal(a.TreatMissingData, 'breaching');
        assert.equal(a.ComparisonOperator, 'LessThanThreshold');
        assert.equal(a.Threshold, 1);
        assert.equal(a.Period * a.EvaluationPeriods, 15 * 60);
      }
    });

    it('dead-letter queue depth, dead-letter notices, compactor errors', () => {
      const dlq = logicalId(s.json, 'AWS::SQS::Queue', 'NotifyDeadLetterQueue');
      const notices = logicalId(s.json, 'AWS::SQS::Queue', 'DeadLetterNotices');
      const depth = alarms().filter((a) => a.MetricName === 'ApproximateNumberOfMessagesVisible');
      assert.deepEqual(
        depth.map((a) => render(a.Dimensions[0].Value)).sort(),
        [`<${dlq}.QueueName>`, `<${notices}.QueueName>`].sort(),
      );
      for (const a of depth) {
        assert.equal(a.Threshold, 0);
        assert.equal(a.ComparisonOperator, 'GreaterThanThreshold');
      }
      const errors = alarms().filter((a) => a.MetricName === 'Errors' && a.Namespace === 'AWS/Lambda');
      assert.equal(errors.length, 1);
    });

    it('every alarm notifies the email topic', () => {
      s.template.resourceCountIs('AWS::SNS::Topic', 1);
      s.template.hasResourceProperties('AWS::SNS::Subscription', {
        Protocol: 'email',
        Endpoint: 'data-platform-oncall@example.com',
      });
      const topic = logicalId(s.json, 'AWS::SNS::Topic', 'Monitoring');
      for (const a of alarms()) assert.deepEqual(a.AlarmActions, [{ Ref: topic }]);
    });
  });

  it('outputs what an operator needs', () => {
    const outputs = Object.keys(s.json.Outputs);
    for (const o of [
      'BucketName',
      'LedgerTableName',
      'NotifyQueueUrl',
      'NotifyDeadLetterQueueUrl',
      'DeadLetterNoticesQueueUrl',
      'CompactorFunctionName',
      'CaptureSecurityGroupId',
      'DashboardName',
      'ClusterName',
      'CompactorLogGroupName',
      'GlueDatabaseName',
      'AthenaWorkGroupName',
      'AthenaResultsBucketName',
      'CaptureServiceorders',
      'CaptureServicebilling',
      'CaptureLogGrouporders',
      'CaptureLogGroupbilling',
    ]) {
      assert.ok(outputs.includes(o), `output ${o} in ${outputs.join(', ')}`);
    }
  });

  it('needs no context lookup (synth works without an AWS account)', () => {
    const assembly = s.app.synth();
    assert.equal(assembly.manifest.missing, undefined);
  });
});

describe('configuration overrides', () => {
  it('queue, schedule, Lambda limits and alarm threshold follow the configuration', () => {
    const raw = exampleConfig();
    raw.queue = { maxReceiveCount: 3 };
    raw.compactor = {
      ...raw.compactor,
      timeoutSeconds: 120,
      memoryMiB: 1024,
      reservedConcurrency: 4,
      maxConcurrency: 3,
      batchSize: 100,
      maxBatchingWindowSeconds: 10,
      sweepMinutes: 15,
      outputFormats: 'jsonl,parquet,avro',
      parquetCompression: 'zstd',
      avroCodec: 'snappy',
      jsonlCompression: 'zstd',
      slotFilter: 'cdc_orders',
      openHourCompactMinutes: 0,
    };
    raw.alarms = { replicationLagSeconds: 600, captureDownMinutes: 30 };
    const { json, template } = synth('overrides', raw);
    const q = json.Resources[logicalId(json, 'AWS::SQS::Queue', 'NotifyQueue')].Properties;
    assert.equal(q.RedrivePolicy.maxReceiveCount, 3);
    assert.ok(q.VisibilityTimeout >= 6 * 120 + 10);
    template.hasResourceProperties('AWS::Lambda::Function', {
      Timeout: 120,
      MemorySize: 1024,
      ReservedConcurrentExecutions: 4,
      Environment: {
        Variables: Match.objectLike({
          OUTPUT_FORMATS: 'jsonl,parquet,avro',
          PARQUET_COMPRESSION: 'zstd',
          AVRO_CODEC: 'snappy',
          JSONL_COMPRESSION: 'zstd',
          CDC_SLOT_NAME: 'cdc_orders',
          OPEN_HOUR_COMPACT_MINUTES: '0',
        }),
      },
    });
    template.hasResourceProperties('AWS::Lambda::EventSourceMapping', {
      BatchSize: 100,
      MaximumBatchingWindowInSeconds: 10,
      ScalingConfig: { MaximumConcurrency: 3 },
    });
    template.hasResourceProperties('AWS::Events::Rule', { ScheduleExpression: 'rate(15 minutes)' });
    template.hasResourceProperties('AWS::CloudWatch::Alarm', {
      MetricName: 'ReplicationLagSeconds',
      Statistic: 'Maximum',
      Threshold: 600,
    });
    template.hasResourceProperties('AWS::CloudWatch::Alarm', {
      MetricName: 'ReplicationLagSeconds',
      Statistic: 'SampleCount',
      EvaluationPeriods: 6,
    });
    template.resourceCountIs('AWS::SNS::Topic', 0);
  });
});
