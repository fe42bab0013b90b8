// Least privilege: every grant names this stack's resources; no data-plane action on "*".

import assert from 'node:assert/strict';
import { before, describe, it } from 'node:test';
import { exampleConfig, iamStatements, logicalId, minimalConfig, Statement, synth, Synthesized } from './helpers';

const LEDGER_ACTIONS = [
  'dynamodb:BatchGetItem',
  'dynamodb:BatchWriteItem',
  'dynamodb:ConditionCheckItem',
  'dynamodb:DeleteItem',
  'dynamodb:DescribeTable',
  'dynamodb:GetItem',
  'dynamodb:PutItem',
  'dynamodb:Query',
  'dynamodb:UpdateItem',
];
const GLUE_ACTIONS = ['glue:GetTable', 'glue:CreateTable', 'glue:UpdateTable'];
const DATA_PLANE = /^(s3|dynamodb|sqs|sns|secretsmanager|kms|logs|lambda|ecs|ssm|glue|athena):/;

/** action -> sorted resources, over the statements of one role with `effect` (Deny: what an explicit denial covers). */
function grants(statements: Statement[], role: string, effect: 'Allow' | 'Deny' = 'Allow'): Map<string, string[]> {
  const m = new Map<string, string[]>();
  for (const s of statements.filter((s) => s.roles.includes(role) && s.effect === effect)) {
    for (const a of s.actions) m.set(a, [...(m.get(a) ?? []), ...s.resources].sort());
  }
  return m;
}

function roleOf(json: any, prefix: string, kind: 'TaskRole' | 'ExecutionRole' | 'CompactorRole'): string {
  return logicalId(json, 'AWS::IAM::Role', kind === 'CompactorRole' ? 'CompactorRole' : `${prefix}Task${kind}`);
}

function checkNoWildcards(s: Synthesized): void {
  for (const st of iamStatements(s.json)) {
    for (const a of st.actions) assert.ok(!a.includes('*'), `wildcard action ${a} in ${st.owner}`);
    if (st.resources.includes('*')) {
      assert.deepEqual(st.actions, ['ecr:GetAuthorizationToken'], `Resource "*" in ${st.owner}: ${st.actions.join(', ')}`);
    }
    for (const a of st.actions) {
      if (DATA_PLANE.test(a)) assert.ok(!st.resources.includes('*'), `${a} on "*" in ${st.owner}`);
    }
  }
}

describe('IAM with a base path', () => {
  let s: Synthesized;
  let bucket: string;
  let table: string;
  before(() => {
    s = synth('example-iam', exampleConfig());
    bucket = logicalId(s.json, 'AWS::S3::Bucket', 'Bucket');
    table = logicalId(s.json, 'AWS::DynamoDB::Table', 'Ledger');
  });

  it('no data-plane action on "*", no wildcard action', () => checkNoWildcards(s));

  it('capture task role: PutObject on staging only, ListBucket, the ledger, SendMessage on the notification queue', () => {
    const queue = logicalId(s.json, 'AWS::SQS::Queue', 'NotifyQueue');
    for (const source of ['Captureorders', 'Capturebilling']) {
      const g = grants(iamStatements(s.json), roleOf(s.json, source, 'TaskRole'));
      const expected = new Map<string, string[]>([
        ['s3:PutObject', [`<${bucket}.Arn>/cdc/_staging/*`]],
        ['s3:ListBucket', [`<${bucket}.Arn>`]],
        ['sqs:SendMessage', [`<${queue}.Arn>`]],
        ...LEDGER_ACTIONS.map((a): [string, string[]] => [a, [`<${table}.Arn>`]]),
      ]);
      assert.deepEqual(new Map([...g].sort()), new Map([...expected].sort()), source);
    }
  });

  it('capture execution role: its image, its log group, its password secret', () => {
    const g = grants(iamStatements(s.json), roleOf(s.json, 'Captureorders', 'ExecutionRole'));
    assert.deepEqual(g.get('secretsmanager:GetSecretValue'), [
      'arn:aws:secretsmanager:eu-west-1:123456789012:secret:pgcdc/orders-cdc-user-AbCdEf',
    ]);
    assert.deepEqual(g.get('ecr:GetAuthorizationToken'), ['*']);
    assert.ok(g.get('ecr:BatchGetImage')?.every((r) => r.includes('container-assets')));
    const logs = logicalId(s.json, 'AWS::Logs::LogGroup', 'CaptureordersLogs');
    assert.deepEqual(g.get('logs:PutLogEvents'), [`<${logs}.Arn>`]);
    assert.ok(![...g.keys()].some((a) => a.startsWith('s3:') || a.startsWith('dynamodb:')));
  });

  it('compactor role: staging, final and dead-letter prefixes, the ledger, the two queues, its Glue database', () => {
    const queue = logicalId(s.json, 'AWS::SQS::Queue', 'NotifyQueue');
    const notices = logicalId(s.json, 'AWS::SQS::Queue', 'DeadLetterNotices');
    const logs = logicalId(s.json, 'AWS::Logs::LogGroup', 'CompactorLogs');
    const g = grants(iamStatements(s.json), roleOf(s.json, '', 'CompactorRole'));
    const staging = `<${bucket}.Arn>/cdc/_staging/*`;
    const finals = [`<${bucket}.Arn>/cdc/*`, `<${bucket}.Arn>/cdc/_dead_letter/*`].sort();
    assert.deepEqual(g.get('s3:GetObject'), [staging, ...finals].sort());
    assert.deepEqual(g.get('s3:DeleteObject'), [staging, ...finals].sort());
    assert.deepEqual(g.get('s3:PutObjectTagging'), [staging]);
    assert.deepEqual(g.get('s3:PutObject'), finals);
    assert.deepEqual(g.get('s3:AbortMultipartUpload'), finals);
    // The final objects' grant covers the base path, staging included: an explicit Deny keeps the
    // compactor from writing over (or abandoning an upload of) a staged batch it has not read yet.
    const d = grants(iamStatements(s.json), roleOf(s.json, '', 'CompactorRole'), 'Deny');
    assert.deepEqual(new Map([...d].sort()), new Map([['s3:AbortMultipartUpload', [staging]], ['s3:PutObject', [staging]]]));
    assert.deepEqual(g.get('s3:ListBucket'), [`<${bucket}.Arn>`]);
    for (const a of LEDGER_ACTIONS) assert.deepEqual(g.get(a), [`<${table}.Arn>`], a);
    assert.deepEqual(g.get('sqs:SendMessage'), [`<${notices}.Arn>`]);
    for (const a of ['sqs:ReceiveMessage', 'sqs:DeleteMessage', 'sqs:ChangeMessageVisibility', 'sqs:GetQueueAttributes']) {
      assert.deepEqual(g.get(a), [`<${queue}.Arn>`], a);
    }
    assert.deepEqual(g.get('logs:PutLogEvents'), [`<${logs}.Arn>`]);
    // The catalog's calls, in its database only (catalog.test.ts checks the statement itself).
    const glue = ['catalog', 'database/pgcdcs3', 'table/pgcdcs3/*'].map((r) => `arn:<AWS::Partition>:glue:<AWS::Region>:<AWS::AccountId>:${r}`).sort();
    for (const a of GLUE_ACTIONS) assert.deepEqual(g.get(a), glue, a);
    const allowed = new Set([
      ...GLUE_ACTIONS,
      ...LEDGER_ACTIONS,
      's3:GetObject', 's3:DeleteObject', 's3:PutObjectTagging', 's3:PutObject', 's3:AbortMultipartUpload', 's3:ListBucket',
      'sqs:SendMessage', 'sqs:ReceiveMessage', 'sqs:DeleteMessage', 'sqs:ChangeMessageVisibility',
      'sqs:GetQueueAttributes', 'sqs:GetQueueUrl', 'logs:CreateLogStream', 'logs:PutLogEvents',
    ]);
    for (const a of g.keys()) assert.ok(allowed.has(a), `unexpected compactor action ${a}`);
  });

  it('no managed policy on any role (no AWSLambdaBasicExecutionRole on every log group)', () => {
    for (const r of Object.values<any>(s.json.Resources).filter((r) => r.Type === 'AWS::IAM::Role')) {
      assert.equal(r.Properties.ManagedPolicyArns, undefined);
    }
  });

  it('no IAM action that does not exist: TransactWriteItems is authorised per item, metrics go through logs', () => {
    for (const st of iamStatements(s.json)) {
      assert.ok(!st.actions.includes('dynamodb:TransactWriteItems'));
      assert.ok(!st.actions.some((a) => a.startsWith('cloudwatch:')), 'metrics are EMF log lines');
    }
  });
});

describe('IAM with an empty base path', () => {
  it('prefixes are _staging/*, _dead_letter/* and the bucket\'s objects', () => {
    const raw = minimalConfig();
    raw.basePath = '';
    const s = synth('empty-base', raw);
    checkNoWildcards(s);
    const bucket = logicalId(s.json, 'AWS::S3::Bucket', 'Bucket');
    const capture = grants(iamStatements(s.json), roleOf(s.json, 'Captureapp', 'TaskRole'));
    assert.deepEqual(capture.get('s3:PutObject'), [`<${bucket}.Arn>/_staging/*`]);
    const compactor = grants(iamStatements(s.json), roleOf(s.json, '', 'CompactorRole'));
    assert.deepEqual(compactor.get('s3:PutObjectTagging'), [`<${bucket}.Arn>/_staging/*`]);
    assert.deepEqual(compactor.get('s3:PutObject'), [`<${bucket}.Arn>/*`, `<${bucket}.Arn>/_dead_letter/*`].sort());
    const denied = grants(iamStatements(s.json), roleOf(s.json, '', 'CompactorRole'), 'Deny');
    assert.deepEqual(denied.get('s3:PutObject'), [`<${bucket}.Arn>/_staging/*`]);
    s.template.hasResourceProperties('AWS::S3::Bucket', {
      LifecycleConfiguration: {
        Rules: [
          { Id: 'ExpireCompactedStaging', Prefix: '_staging/', TagFilters: [{ Key: 'compacted', Value: 'true' }], ExpirationInDays: 1, Status: 'Enabled' },
          { Id: 'ExpireAllStaging', Prefix: '_staging/', ExpirationInDays: 30, Status: 'Enabled' },
          { Id: 'AbortIncompleteMultipartUploads', AbortIncompleteMultipartUpload: { DaysAfterInitiation: 7 }, Status: 'Enabled' },
        ],
      },
    });
  });
});
