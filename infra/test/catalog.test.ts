// The query side: the Glue database the compactor keeps (GLUE_DATABASE), its exact Glue grant, the
// Athena workgroup and its results bucket, their outputs and alarm; and none of it with
// catalog.enabled false.

import assert from 'node:assert/strict';
import { before, describe, it } from 'node:test';
import { Match } from 'aws-cdk-lib/assertions';
import { dashboardBody, dashboardMetrics, exampleConfig, iamStatements, logicalId, minimalConfig, render, synth, Synthesized } from './helpers';

const GLUE_ACTIONS = ['glue:CreateTable', 'glue:GetTable', 'glue:UpdateTable'];
const glueArn = (resource: string) => `arn:<AWS::Partition>:glue:<AWS::Region>:<AWS::AccountId>:${resource}`;

const compactorEnv = (json: any): Record<string, string> => {
  const fn = json.Resources[logicalId(json, 'AWS::Lambda::Function', 'Compactor')].Properties;
  return Object.fromEntries(Object.entries(fn.Environment.Variables).map(([k, v]) => [k, render(v)]));
};
const alarms = (json: any) => Object.values<any>(json.Resources).filter((r) => r.Type === 'AWS::CloudWatch::Alarm').map((r) => r.Properties);

describe('catalog on (config.example.json: the default)', () => {
  let s: Synthesized;
  let database: string;
  let workGroup: string;
  let results: string;
  before(() => {
    s = synth('example-catalog', exampleConfig());
    database = logicalId(s.json, 'AWS::Glue::Database', 'CatalogDatabase');
    workGroup = logicalId(s.json, 'AWS::Athena::WorkGroup', 'CatalogWorkGroup');
    results = logicalId(s.json, 'AWS::S3::Bucket', 'CatalogResultsBucket');
  });

  it('a Glue database named after the stack, in this account\'s catalog, deleted with the stack', () => {
    s.template.resourceCountIs('AWS::Glue::Database', 1);
    const db = s.json.Resources[database];
    assert.deepEqual(db.Properties.CatalogId, { Ref: 'AWS::AccountId' });
    assert.equal(db.Properties.DatabaseInput.Name, 'pgcdcs3');
    // Only table definitions the compactor writes again; a retained one would block re-creating the stack.
    assert.equal(db.DeletionPolicy, undefined);
    assert.equal(s.json.Resources[workGroup].DeletionPolicy, undefined);
  });

  it('the compactor role: exactly GetTable, CreateTable, UpdateTable on the catalog, the database and its tables', () => {
    const glue = iamStatements(s.json).filter((st) => st.actions.some((a) => a.startsWith('glue:')));
    assert.equal(glue.length, 1, 'one statement grants Glue actions');
    const [st] = glue;
    assert.deepEqual(st.roles, [logicalId(s.json, 'AWS::IAM::Role', 'CompactorRole')]);
    assert.equal(st.effect, 'Allow');
    assert.deepEqual([...st.actions].sort(), GLUE_ACTIONS);
    assert.deepEqual(st.resources, [glueArn('catalog'), glueArn('database/pgcdcs3'), glueArn('table/pgcdcs3/*')]);
    assert.equal(st.condition, undefined);
    const policy = s.json.Resources[st.owner].Properties.PolicyDocument.Statement;
    assert.ok(policy.some((x: any) => x.Sid === 'GlueCatalog' && x.Action.length === 3), 'its own statement, sid GlueCatalog');
    // Nothing of Athena's: querying is the querying principal's business.
    assert.ok(!iamStatements(s.json).some((x) => x.actions.some((a) => a.startsWith('athena:'))));
  });

  it('the compactor environment: GLUE_DATABASE refers to the database, OPEN_HOUR_COMPACT_MINUTES 15', () => {
    const env = compactorEnv(s.json);
    assert.equal(env.GLUE_DATABASE, `<${database}>`, 'a Ref: the function is created after the database');
    assert.equal(env.OPEN_HOUR_COMPACT_MINUTES, '15');
  });

  it('the Athena workgroup enforces SSE-S3 results under results/ of its own bucket, and publishes metrics', () => {
    s.template.resourceCountIs('AWS::Athena::WorkGroup', 1);
    const wg = s.json.Resources[workGroup].Properties;
    assert.equal(wg.Name, 'PgCdcS3');
    assert.equal(wg.State, 'ENABLED');
    assert.equal(wg.RecursiveDeleteOption, true);
    const c = wg.WorkGroupConfiguration;
    assert.equal(c.EnforceWorkGroupConfiguration, true);
    assert.equal(c.PublishCloudWatchMetricsEnabled, true);
    assert.equal(render(c.ResultConfiguration.OutputLocation), `s3://<${results}>/results/`);
    assert.deepEqual(c.ResultConfiguration.EncryptionConfiguration, { EncryptionOption: 'SSE_S3' });
    assert.deepEqual(c.ResultConfiguration.ExpectedBucketOwner, { Ref: 'AWS::AccountId' });
  });

  it('the results bucket: encrypted, private, TLS only, results expire after 30 days, retained like the data', () => {
    const b = s.json.Resources[results];
    assert.equal(b.DeletionPolicy, 'Retain');
    assert.deepEqual(b.Properties.BucketEncryption, {
      ServerSideEncryptionConfiguration: [{ ServerSideEncryptionByDefault: { SSEAlgorithm: 'AES256' } }],
    });
    assert.deepEqual(b.Properties.PublicAccessBlockConfiguration, {
      BlockPublicAcls: true,
      BlockPublicPolicy: true,
      IgnorePublicAcls: true,
      RestrictPublicBuckets: true,
    });
    assert.deepEqual(b.Properties.OwnershipControls, { Rules: [{ ObjectOwnership: 'BucketOwnerEnforced' }] });
    assert.deepEqual(b.Properties.LifecycleConfiguration.Rules, [
      { Id: 'ExpireQueryResults', ExpirationInDays: 30, AbortIncompleteMultipartUpload: { DaysAfterInitiation: 1 }, Status: 'Enabled' },
    ]);
    s.template.hasResourceProperties('AWS::S3::BucketPolicy', {
      Bucket: { Ref: results },
      PolicyDocument: {
        Statement: Match.arrayWith([
          Match.objectLike({ Effect: 'Deny', Action: 's3:*', Condition: { Bool: { 'aws:SecureTransport': 'false' } } }),
          Match.objectLike({ Effect: 'Deny', Action: 's3:*', Condition: { NumericLessThan: { 's3:TlsVersion': 1.2 } } }),
        ]),
      },
    });
  });

  it('outputs the database, the workgroup and the results bucket', () => {
    assert.deepEqual(s.json.Outputs.GlueDatabaseName.Value, { Ref: database });
    assert.deepEqual(s.json.Outputs.AthenaWorkGroupName.Value, { Ref: workGroup });
    assert.deepEqual(s.json.Outputs.AthenaResultsBucketName.Value, { Ref: results });
  });

  it('an alarm per source on CatalogUpdateFailures: any failure, cleared after 3 quiet periods', () => {
    const catalog = alarms(s.json).filter((a) => a.MetricName === 'CatalogUpdateFailures');
    assert.deepEqual(catalog.map((a) => JSON.stringify(a.Dimensions)).sort(), [
      JSON.stringify([{ Name: 'Slot', Value: 'cdc_billing' }]),
      JSON.stringify([{ Name: 'Slot', Value: 'cdc_orders' }]),
    ]);
    for (const a of catalog) {
      assert.equal(a.Namespace, 'PgCdc');
      assert.equal(a.Statistic, 'Sum');
      assert.equal(a.Period, 300);
      assert.equal(a.Threshold, 0);
      assert.equal(a.ComparisonOperator, 'GreaterThanThreshold');
      assert.equal(a.EvaluationPeriods, 3);
      assert.equal(a.DatapointsToAlarm, 1);
      assert.equal(a.TreatMissingData, 'notBreaching');
      assert.match(a.AlarmName, /^PgCdcS3-(orders|billing)-catalog-updates$/);
      assert.ok(a.AlarmActions?.length === 1, 'notifies the topic');
    }
  });

  it('the dashboard graphs CatalogUpdateFailures per slot and shows its alarms', () => {
    const body = dashboardBody(s.json);
    const lines = dashboardMetrics(body).filter((m) => m.name === 'CatalogUpdateFailures');
    assert.deepEqual(lines.map((l) => l.dims.Slot).sort(), ['cdc_billing', 'cdc_orders']);
    const status = body.widgets.find((w: any) => w.type === 'alarm').properties.alarms as string[];
    const ids = Object.keys(s.json.Resources).filter((k) => s.json.Resources[k].Properties?.MetricName === 'CatalogUpdateFailures');
    for (const id of ids) assert.ok(status.includes(`<${id}.Arn>`), id);
  });
});

describe('catalog settings', () => {
  it('database name, results retention, stack name and the open-hour interval follow the configuration', () => {
    const raw: Record<string, any> = { ...minimalConfig(), stackName: 'Orders-Pipeline', removalPolicy: 'destroy' };
    raw.catalog = { databaseName: 'cdc_lake', resultsRetentionDays: 7 };
    raw.compactor = { ...raw.compactor, openHourCompactMinutes: 0 };
    const { json, template } = synth('catalog-settings', raw);
    template.hasResourceProperties('AWS::Glue::Database', { DatabaseInput: Match.objectLike({ Name: 'cdc_lake' }) });
    template.hasResourceProperties('AWS::Athena::WorkGroup', { Name: 'Orders-Pipeline' });
    const results = json.Resources[logicalId(json, 'AWS::S3::Bucket', 'CatalogResultsBucket')];
    assert.equal(results.Properties.LifecycleConfiguration.Rules[0].ExpirationInDays, 7);
    assert.equal(results.DeletionPolicy, 'Delete');
    const glue = iamStatements(json).find((st) => st.actions.includes('glue:GetTable'))!;
    assert.deepEqual(glue.resources, [glueArn('catalog'), glueArn('database/cdc_lake'), glueArn('table/cdc_lake/*')]);
    assert.equal(compactorEnv(json).OPEN_HOUR_COMPACT_MINUTES, '0');
  });

  it('a derived database name: the stack name in lower case, - as _', () => {
    const { template } = synth('catalog-derived-name', { ...minimalConfig(), stackName: 'Orders-Pipeline' });
    template.hasResourceProperties('AWS::Glue::Database', { DatabaseInput: Match.objectLike({ Name: 'orders_pipeline' }) });
  });
});

describe('catalog off', () => {
  const checkOff = (s: Synthesized, label: string) => {
    for (const type of ['AWS::Glue::Database', 'AWS::Athena::WorkGroup']) s.template.resourceCountIs(type, 0);
    s.template.resourceCountIs('AWS::S3::Bucket', 1);
    for (const st of iamStatements(s.json)) {
      assert.ok(!st.actions.some((a) => a.startsWith('glue:') || a.startsWith('athena:')), `${label}: ${st.actions.join(', ')} in ${st.owner}`);
    }
    const env = compactorEnv(s.json);
    assert.equal(env.GLUE_DATABASE, undefined, `${label}: no GLUE_DATABASE, so no catalog call`);
    assert.equal(env.OPEN_HOUR_COMPACT_MINUTES, '15', `${label}: set whatever the catalog`);
    for (const o of ['GlueDatabaseName', 'AthenaWorkGroupName', 'AthenaResultsBucketName']) assert.equal(s.json.Outputs[o], undefined, `${label}: ${o}`);
    assert.ok(!alarms(s.json).some((a) => a.MetricName === 'CatalogUpdateFailures'), `${label}: no catalog alarm`);
    assert.ok(!JSON.stringify(s.json).includes('glue'), `${label}: nothing mentions Glue`);
  };

  it('catalog.enabled false: no database, workgroup, results bucket, Glue grant, GLUE_DATABASE, output or alarm', () => {
    const raw = exampleConfig();
    raw.catalog = { enabled: false };
    checkOff(synth('catalog-off', raw), 'enabled false');
  });

  it('JSONL only: off by default (the catalog describes the Parquet files)', () => {
    const raw = minimalConfig();
    raw.compactor = { ...raw.compactor, outputFormats: 'jsonl' };
    checkOff(synth('catalog-off-jsonl', raw), 'jsonl only');
  });
});
