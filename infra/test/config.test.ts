// The configuration: defaults, sources of configuration, and errors that name the setting.

import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, it } from 'node:test';
import { compactorAssetPath, ConfigError, DEFAULTS, loadConfig, parseConfig } from '../lib/config';
import { tempDir } from './helpers';

const source = { name: 'app', host: 'db', database: 'app', user: 'cdc', slotName: 'cdc_app' };
const ctx = (values: Record<string, unknown>) => ({ tryGetContext: (k: string) => values[k] });

function fails(raw: unknown, setting: RegExp): void {
  assert.throws(() => parseConfig(raw), (e: unknown) => {
    assert.ok(e instanceof ConfigError, String(e));
    assert.match(e.message, setting);
    return true;
  });
}

describe('configuration', () => {
  it('fills in the defaults', () => {
    const c = parseConfig({ sources: [source] });
    assert.equal(c.stackName, 'PgCdcS3');
    assert.equal(c.basePath, 'cdc');
    assert.equal(c.versioned, false);
    assert.equal(c.queue.maxReceiveCount, 5);
    assert.equal(c.compactor.reservedConcurrency, undefined, 'no reserved concurrency by default');
    assert.equal(c.compactor.maxConcurrency, 2);
    assert.equal(c.alarms.pendingHourAgeSeconds, 7200);
    assert.equal(c.compactor.timeoutSeconds, 300);
    assert.equal(c.compactor.memoryMiB, 1024);
    assert.equal(c.compactor.sweepMinutes, 5);
    assert.equal(c.compactor.openHourCompactMinutes, 15);
    assert.deepEqual(c.catalog, { enabled: true, databaseName: 'pgcdcs3', resultsRetentionDays: 30 });
    assert.equal(c.compactor.asset, '../target/lambda/compactor/bootstrap.zip');
    assert.equal(c.alarms.replicationLagSeconds, 900);
    const s = c.sources[0];
    assert.equal(s.port, 5432);
    assert.equal(s.sslMode, 'verify-full', 'the server is verified by default');
    assert.equal(s.sslRootCert, '/etc/ssl/rds/global-bundle.pem', 'against the RDS bundle in the image');
    assert.equal(c.stagingMaxAgeDays, 30);
    assert.equal(c.capture.spot, false);
    assert.equal(s.publication, 'cdc_publication');
    assert.equal(s.cpu, 256);
    assert.equal(s.memoryMiB, 512);
    assert.equal(s.flushIntervalMs, DEFAULTS.capture.flushIntervalMs);
    assert.equal(s.metricsPerTable, false);
    assert.equal(s.lagAlarmSeconds, 900);
    assert.deepEqual(s.tables, []);
  });

  it('source settings fall back to the capture defaults, and win over them', () => {
    const c = parseConfig({
      capture: { cpu: 512, memoryMiB: 1024, flushIntervalMs: 5000 },
      alarms: { replicationLagSeconds: 60 },
      sources: [source, { ...source, name: 'b', slotName: 'cdc_b', cpu: 256, memoryMiB: 2048, lagAlarmSeconds: 30 }],
    });
    assert.deepEqual([c.sources[0].cpu, c.sources[0].memoryMiB, c.sources[0].flushIntervalMs, c.sources[0].lagAlarmSeconds], [512, 1024, 5000, 60]);
    assert.deepEqual([c.sources[1].cpu, c.sources[1].memoryMiB, c.sources[1].lagAlarmSeconds], [256, 2048, 30]);
  });

  it('trims slashes from the base path and accepts an empty one', () => {
    assert.equal(parseConfig({ basePath: '/data/cdc/', sources: [source] }).basePath, 'data/cdc');
    assert.equal(parseConfig({ basePath: '', sources: [source] }).basePath, '');
    fails({ basePath: 'a//b', sources: [source] }, /basePath/);
    // Every staging object expires after stagingMaxAgeDays: a pending hour must alarm well before.
    fails({ stagingExpirationDays: 5, stagingMaxAgeDays: 5, sources: [source] }, /stagingMaxAgeDays.*stagingExpirationDays/);
    fails({ stagingMaxAgeDays: 2, alarms: { pendingHourAgeSeconds: 86400 }, sources: [source] }, /stagingMaxAgeDays.*pendingHourAgeSeconds/);
    fails({ capture: { spot: 'yes' }, sources: [source] }, /capture\.spot/);
    fails({ basePath: 'cdc/*', sources: [source] }, /basePath/);
  });

  it('catalog: the database name follows the stack name; off without Parquet unless asked for', () => {
    // Glue and Athena keep names in lower case, and - would need quoting in every query.
    assert.equal(parseConfig({ stackName: 'Orders-Pipeline-2', sources: [source] }).catalog.databaseName, 'orders_pipeline_2');
    const named = parseConfig({ catalog: { databaseName: 'cdc_lake', resultsRetentionDays: 7 }, sources: [source] });
    assert.deepEqual(named.catalog, { enabled: true, databaseName: 'cdc_lake', resultsRetentionDays: 7 });
    assert.equal(parseConfig({ catalog: { enabled: false }, sources: [source] }).catalog.enabled, false);
    // The catalog describes the Parquet files: JSONL only turns it off by default...
    assert.equal(parseConfig({ compactor: { outputFormats: 'jsonl' }, sources: [source] }).catalog.enabled, false);
    // ...and asking for it then is an error.
    fails({ compactor: { outputFormats: 'jsonl' }, catalog: { enabled: true }, sources: [source] }, /catalog\.enabled: .*add parquet to compactor\.outputFormats/);
    assert.equal(parseConfig({ compactor: { openHourCompactMinutes: 0 }, sources: [source] }).compactor.openHourCompactMinutes, 0);
  });

  it('catalog and open-hour errors name the setting', () => {
    fails({ catalog: { databaseName: 'Orders' }, sources: [source] }, /catalog\.databaseName: "Orders" is not a Glue database name/);
    fails({ catalog: { databaseName: 'orders-db' }, sources: [source] }, /catalog\.databaseName: "orders-db"/);
    fails({ catalog: { databaseName: 'x'.repeat(256) }, sources: [source] }, /catalog\.databaseName/);
    fails({ catalog: { enabled: 'yes' }, sources: [source] }, /catalog\.enabled: must be true or false/);
    fails({ catalog: { resultsRetentionDays: 0 }, sources: [source] }, /catalog\.resultsRetentionDays: must be between 1 and 3650/);
    fails({ catalog: { resultsRetentionDays: 1.5 }, sources: [source] }, /catalog\.resultsRetentionDays: must be an integer/);
    fails({ catalog: { database: 'x' }, sources: [source] }, /catalog\.database: unknown setting/);
    fails({ catalog: true, sources: [source] }, /catalog: must be an object/);
    fails({ compactor: { openHourCompactMinutes: 61 }, sources: [source] }, /compactor\.openHourCompactMinutes: must be between 0 and 60/);
    fails({ compactor: { openHourCompactMinutes: -1 }, sources: [source] }, /compactor\.openHourCompactMinutes/);
    fails({ compactor: { openHourCompactMinutes: '15' }, sources: [source] }, /compactor\.openHourCompactMinutes: must be an integer/);
  });

  it('accepts tables as a list or a comma-separated string', () => {
    const c = parseConfig({ sources: [{ ...source, tables: 'public.a, sales.b' }] });
    assert.deepEqual(c.sources[0].tables, ['public.a', 'sales.b']);
  });

  it('errors name the setting', () => {
    fails({}, /sources: configure at least one source/);
    fails({ sources: [{ ...source, slotName: 'Bad-Slot' }] }, /sources\[0\]\.slotName/);
    fails({ sources: [source, { ...source, name: 'other' }] }, /slotName.*appears twice/);
    fails({ sources: [source, { ...source, slotName: 'cdc_x' }] }, /name.*appears twice/);
    fails({ sources: [{ ...source, cpu: 256, memoryMiB: 4096 }] }, /sources\[0\]\.memoryMiB/);
    fails({ sources: [{ ...source, cpu: 300 }] }, /sources\[0\]\.cpu/);
    // Below the smallest size measured: an hour's compaction peaks at 143-213 MB.
    fails({ sources: [source], compactor: { memoryMiB: 256 } }, /compactor\.memoryMiB/);
    fails({ sources: [{ ...source, sslMode: 'allow' }] }, /sources\[0\]\.sslMode/);
    fails({ sources: [{ ...source, tables: ['orders'] }] }, /sources\[0\]\.tables/);
    fails({ sources: [{ ...source, host: undefined }] }, /sources\[0\]\.host: is required/);
    fails({ sources: [{ ...source, pasword: 'x' }] }, /sources\[0\]\.pasword: unknown setting/);
    fails({ compactor: { timeout: 3 }, sources: [source] }, /compactor\.timeout: unknown setting/);
    fails({ sources: [{ ...source, passwordSecretArn: 'arn:aws:secretsmanager:eu-west-1:123456789012:secret:x-AbCdEf', passwordSecretName: 'x' }] }, /either passwordSecretArn or passwordSecretName/);
    fails({ sources: [{ ...source, passwordSecretArn: 'arn:aws:secretsmanager:eu-west-1:123456789012:secret:x' }] }, /complete secret ARN/);
    // ECS finds a secret given by name through its ARN without the random suffix, which Secrets
    // Manager cannot resolve when the name itself ends in a hyphen and six characters.
    fails({ sources: [{ ...source, passwordSecretName: 'pgcdc/app-reader' }] }, /sources\[0\]\.passwordSecretName: .*passwordSecretArn/);
    assert.equal(parseConfig({ sources: [{ ...source, passwordSecretName: 'pgcdc/app-db' }] }).sources[0].passwordSecretName, 'pgcdc/app-db');
    fails({ queue: { maxReceiveCount: 0 }, sources: [source] }, /queue\.maxReceiveCount/);
    fails({ compactor: { reservedConcurrency: 1 }, sources: [source] }, /compactor\.reservedConcurrency: must be more than compactor\.maxConcurrency/);
    // Equal: a scheduled or manual sweep takes a slot the SQS pollers count on.
    fails({ compactor: { reservedConcurrency: 2, maxConcurrency: 2 }, sources: [source] }, /compactor\.reservedConcurrency/);
    fails({ compactor: { maxConcurrency: 1 }, sources: [source] }, /compactor\.maxConcurrency/);
    fails({ compactor: { outputFormats: 'csv' }, sources: [source] }, /compactor\.outputFormats/);
    fails({ compactor: { outputFormats: 'avro,avro' }, sources: [source] }, /compactor\.outputFormats/);
    fails({ compactor: { avroCodec: 'bzip2' }, sources: [source] }, /compactor\.avroCodec/);
    fails({ compactor: { jsonlCompression: 'brotli' }, sources: [source] }, /compactor\.jsonlCompression/);
    fails({ compactor: { timeoutSeconds: 901 }, sources: [source] }, /compactor\.timeoutSeconds/);
    fails({ alarms: { email: 'nobody' }, sources: [source] }, /alarms\.email/);
    fails({ alarms: { captureDownMinutes: 7 }, sources: [source] }, /alarms\.captureDownMinutes/);
    fails({ vpc: { vpcId: 'vpc-0abc', availabilityZones: ['eu-west-1a'] }, sources: [source] }, /publicSubnetIds or privateSubnetIds/);
    fails({ vpc: { vpcId: 'vpc-0abc', availabilityZones: ['eu-west-1a'], publicSubnetIds: ['subnet-1', 'subnet-2'] }, sources: [source] }, /one subnet per availability zone/);
  });

  it('loads -c config=FILE, the pgcdc context, and -c compactorAsset', () => {
    const dir = tempDir('pgcdc-config-');
    const file = path.join(dir, 'pipeline.json');
    fs.writeFileSync(file, JSON.stringify({ stackName: 'FromFile', sources: [source] }));
    assert.equal(loadConfig(ctx({ config: file })).stackName, 'FromFile');
    assert.equal(loadConfig(ctx({ pgcdc: { stackName: 'FromContext', sources: [source] } })).stackName, 'FromContext');
    assert.equal(loadConfig(ctx({ pgcdc: JSON.stringify({ stackName: 'FromString', sources: [source] }) })).stackName, 'FromString');
    const c = loadConfig(ctx({ config: file, compactorAsset: '/tmp/x.zip' }));
    assert.equal(c.compactor.asset, '/tmp/x.zip');
    assert.throws(() => loadConfig(ctx({ config: path.join(dir, 'missing.json') })), /-c config: cannot read/);
    fs.writeFileSync(file, '{ not json');
    assert.throws(() => loadConfig(ctx({ config: file })), /-c config: .* is not valid JSON/);
  });

  it('a missing compactor zip says how to build it', () => {
    const c = parseConfig({ compactor: { asset: '/nonexistent/bootstrap.zip' }, sources: [source] });
    assert.throws(() => compactorAssetPath(c), /cargo lambda build --release --arm64 --output-format zip -p compactor/);
  });

  it('config.example.json is valid', () => {
    const c = parseConfig(JSON.parse(fs.readFileSync(path.join(__dirname, '..', 'config.example.json'), 'utf8')));
    assert.equal(c.sources.length, 2);
  });
});
