// The stack's other shapes: an existing VPC, a generated placeholder secret, versioning, one source.

import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, it } from 'node:test';
import { Match } from 'aws-cdk-lib/assertions';
import { INFRA_DIR } from '../lib/config';
import { containerEnv, logicalId, minimalConfig, synth } from './helpers';

const VPC = {
  vpcId: 'vpc-0123456789abcdef0',
  availabilityZones: ['eu-west-1a', 'eu-west-1b'],
};

describe('variants', () => {
  it('an existing VPC with public subnets: nothing network-related is created', () => {
    const raw = minimalConfig();
    raw.vpc = { ...VPC, publicSubnetIds: ['subnet-0123456789abcdef0', 'subnet-0123456789abcdef1'] };
    const { template, json, app } = synth('existing-vpc-public', raw);
    for (const type of ['AWS::EC2::VPC', 'AWS::EC2::Subnet', 'AWS::EC2::InternetGateway', 'AWS::EC2::NatGateway', 'AWS::EC2::VPCEndpoint']) {
      template.resourceCountIs(type, 0);
    }
    template.hasResourceProperties('AWS::ECS::Service', {
      NetworkConfiguration: {
        AwsvpcConfiguration: {
          AssignPublicIp: 'ENABLED',
          Subnets: ['subnet-0123456789abcdef0', 'subnet-0123456789abcdef1'],
        },
      },
    });
    template.hasResourceProperties('AWS::EC2::SecurityGroup', { VpcId: 'vpc-0123456789abcdef0' });
    assert.equal(app.synth().manifest.missing, undefined, 'no lookup');
    assert.equal(json.Resources[logicalId(json, 'AWS::S3::Bucket', 'Bucket')].Properties.LifecycleConfiguration.Rules[0].Prefix, 'cdc/_staging/');
  });

  it('an existing VPC with private subnets: no public IP', () => {
    const raw = minimalConfig();
    raw.vpc = { ...VPC, privateSubnetIds: ['subnet-0123456789abcdef2', 'subnet-0123456789abcdef3'] };
    const { template } = synth('existing-vpc-private', raw);
    template.hasResourceProperties('AWS::ECS::Service', {
      NetworkConfiguration: {
        AwsvpcConfiguration: {
          AssignPublicIp: 'DISABLED',
          Subnets: ['subnet-0123456789abcdef2', 'subnet-0123456789abcdef3'],
        },
      },
    });
  });

  it('no password secret configured: a generated placeholder secret, shown in the outputs', () => {
    const { template, json } = synth('generated-secret', minimalConfig());
    template.resourceCountIs('AWS::SecretsManager::Secret', 1);
    const secret = logicalId(json, 'AWS::SecretsManager::Secret', 'Captureapp');
    const task = json.Resources[logicalId(json, 'AWS::ECS::TaskDefinition', 'Captureapp')];
    assert.deepEqual(task.Properties.ContainerDefinitions[0].Secrets, [{ Name: 'POSTGRES_PASSWORD', ValueFrom: { Ref: secret } }]);
    assert.deepEqual(json.Outputs.PasswordSecretapp.Value, { Ref: secret });
    const env = containerEnv(json, logicalId(json, 'AWS::ECS::TaskDefinition', 'Captureapp'));
    assert.equal(env.PGSSLMODE, 'verify-full', 'the server is verified by default');
    assert.equal(env.PGSSLROOTCERT, '/etc/ssl/rds/global-bundle.pem');
    assert.equal(env.CDC_PUBLICATION, 'cdc_publication');
    assert.equal(env.POSTGRES_PORT, '5432');
    template.resourceCountIs('AWS::ECS::Service', 1);
  });

  it('versioning on: noncurrent versions of compacted staging objects expire too', () => {
    const raw = { ...minimalConfig(), versioned: true, stagingExpirationDays: 2 };
    const { template } = synth('versioned', raw);
    template.hasResourceProperties('AWS::S3::Bucket', {
      VersioningConfiguration: { Status: 'Enabled' },
      LifecycleConfiguration: {
        Rules: Match.arrayWith([
          Match.objectLike({
            Prefix: 'cdc/_staging/',
            TagFilters: [{ Key: 'compacted', Value: 'true' }],
            ExpirationInDays: 2,
            NoncurrentVersionExpiration: { NoncurrentDays: 1 },
          }),
        ]),
      },
    });
  });

  it('removalPolicy destroy: no retained data, no deletion protection', () => {
    const { template } = synth('destroy', { ...minimalConfig(), removalPolicy: 'destroy' });
    template.hasResource('AWS::S3::Bucket', { DeletionPolicy: 'Delete' });
    template.hasResource('AWS::DynamoDB::Table', { DeletionPolicy: 'Delete' });
    template.hasResourceProperties('AWS::DynamoDB::Table', { DeletionProtectionEnabled: Match.absent() });
  });

  it('removalPolicy destroy empties the buckets before deleting them', () => {
    const { template } = synth('destroy-empties', { ...minimalConfig(), removalPolicy: 'destroy' });
    // The data bucket and the Athena results bucket.
    template.resourceCountIs('Custom::S3AutoDeleteObjects', 2);
    const retained = synth('retain-keeps', minimalConfig());
    retained.template.resourceCountIs('Custom::S3AutoDeleteObjects', 0);
  });

  it('Fargate Spot is opt-in: the capture services then run on FARGATE_SPOT only', () => {
    const plain = synth('on-demand', minimalConfig());
    plain.template.hasResourceProperties('AWS::ECS::Service', { LaunchType: 'FARGATE', CapacityProviderStrategy: Match.absent() });
    plain.template.resourceCountIs('AWS::ECS::ClusterCapacityProviderAssociations', 0);
    const raw = minimalConfig();
    raw.capture = { spot: true };
    const spot = synth('spot', raw);
    spot.template.hasResourceProperties('AWS::ECS::Service', {
      LaunchType: Match.absent(),
      CapacityProviderStrategy: [{ CapacityProvider: 'FARGATE_SPOT', Weight: 1 }],
    });
    spot.template.hasResourceProperties('AWS::ECS::ClusterCapacityProviderAssociations', {
      CapacityProviders: Match.arrayWith(['FARGATE_SPOT']),
    });
  });

  it('per-table metrics are opt-in per source', () => {
    const raw = minimalConfig();
    raw.sources[0].metricsPerTable = true;
    const { json } = synth('per-table-metrics', raw);
    assert.equal(containerEnv(json, logicalId(json, 'AWS::ECS::TaskDefinition', 'Captureapp')).METRICS_PER_TABLE, 'true');
  });

  it('the code never looks anything up in the AWS account (no Vpc.fromLookup)', () => {
    for (const dir of ['lib', 'bin']) {
      for (const f of fs.readdirSync(path.join(INFRA_DIR, dir))) {
        const text = fs.readFileSync(path.join(INFRA_DIR, dir, f), 'utf8');
        assert.ok(!/fromLookup|valueFromLookup/.test(text), `${dir}/${f}`);
      }
    }
  });
});
