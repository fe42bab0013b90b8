// cdk-nag's AwsSolutions pack finds nothing unsuppressed, in every shape the stack takes. Every
// suppression is in lib/ next to the resource it concerns, with its reason.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { Annotations, Match } from 'aws-cdk-lib/assertions';
import { exampleConfig, minimalConfig, synth } from './helpers';

const variants: [string, () => Record<string, any>][] = [
  ['config.example.json (two sources, existing secrets, email alarms)', exampleConfig],
  [
    'generated secret, empty base path, versioned bucket, destroy on removal',
    () => ({ ...minimalConfig(), basePath: '', versioned: true, removalPolicy: 'destroy' }),
  ],
  [
    'existing VPC with private subnets, secret by name with a KMS key, no catalog',
    () => {
      const raw = minimalConfig();
      raw.vpc = {
        vpcId: 'vpc-0123456789abcdef0',
        availabilityZones: ['eu-west-1a', 'eu-west-1b'],
        privateSubnetIds: ['subnet-0123456789abcdef0', 'subnet-0123456789abcdef1'],
      };
      raw.sources[0].passwordSecretName = 'pgcdc/app';
      raw.capture = { spot: true };
      raw.sources[0].passwordSecretKmsKeyArn = 'arn:aws:kms:eu-west-1:123456789012:key/11111111-2222-3333-4444-555555555555';
      raw.catalog = { enabled: false };
      return raw;
    },
  ],
];

describe('cdk-nag AwsSolutions', () => {
  for (const [i, [name, config]] of variants.entries()) {
    it(`no unsuppressed error or warning: ${name}`, () => {
      const { stack } = synth(`nag-${i}`, config(), { nag: true });
      const annotations = Annotations.fromStack(stack);
      const show = (xs: { id: string; entry: { data?: unknown } }[]) =>
        xs.map((x) => `${x.id}: ${String(x.entry.data).split('\n')[0]}`).join('\n');
      const errors = annotations.findError('*', Match.stringLikeRegexp('AwsSolutions-.*'));
      const warnings = annotations.findWarning('*', Match.stringLikeRegexp('AwsSolutions-.*'));
      assert.equal(errors.length, 0, show(errors));
      assert.equal(warnings.length, 0, show(warnings));
      // Nor any other warning or error of CDK's own.
      const other = [...annotations.findWarning('*', Match.anyValue()), ...annotations.findError('*', Match.anyValue())];
      assert.equal(other.length, 0, show(other));
    });
  }

  it('every suppression gives a reason', () => {
    const { json } = synth('nag-reasons', exampleConfig(), { nag: true });
    let count = 0;
    for (const [id, r] of Object.entries<any>(json.Resources)) {
      for (const s of r.Metadata?.cdk_nag?.rules_to_suppress ?? []) {
        count++;
        assert.ok(typeof s.reason === 'string' && s.reason.length >= 40, `${id} ${s.id}: reason too short`);
      }
    }
    assert.ok(count > 0);
  });
});
