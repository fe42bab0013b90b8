// The Terraform module (infra/terraform), checked offline: parsed, every block against the AWS
// provider's schema, every reference resolved, the example's module call against the module's
// variables, and parity with the CDK stack's synthesized template with the catalog on and off
// (resource kinds, IAM actions per role, environment variables, alarm metrics, outputs). checkov
// runs in scripts/test.sh.

import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { before, describe, it } from 'node:test';
import { parse } from '@cdktf/hcl2json';
import { REPO_ROOT } from '../lib/config';
import { exampleConfig, iamStatements, logicalId, synth, Synthesized } from './helpers';
import { blocks, checkReferences, checkSchema, Hcl, loadModule, locals, providerSchema, TERRAFORM_DIR } from './terraform';

const EXAMPLE_DIR = path.join(TERRAFORM_DIR, 'examples', 'two-sources');

async function hcl(text: string): Promise<Record<string, Hcl>> {
  return { 'main.tf': await parse('main.tf', text) };
}

describe('terraform: the checks themselves', () => {
  it('the provider schema knows arguments, blocks, required-ness and exported attributes', () => {
    const bucket = providerSchema('aws_s3_bucket');
    assert.ok(bucket && bucket.args.has('force_destroy') && !bucket.args.get('force_destroy')!.required);
    assert.ok(bucket.attributes.has('arn') && bucket.attributes.has('bucket_regional_domain_name'));
    const lambda = providerSchema('aws_lambda_function')!;
    assert.equal(lambda.args.get('function_name')?.required, true);
    assert.equal(lambda.args.get('environment')?.block, true);
    assert.equal(providerSchema('aws_no_such_thing'), null);
    assert.ok(providerSchema('aws_iam_policy_document', true)?.args.get('statement')?.nested?.args.has('actions'));
  });

  it('an unknown argument, a missing required one, a misplaced block and a bad literal fail', async () => {
    const files = await hcl(`
resource "aws_sqs_queue" "q" {
  name                    = "q"
  visibility_timeout_secs = 30
  sqs_managed_sse_enabled = "maybe"
}
resource "aws_lambda_function" "f" {
  role    = "arn:aws:iam::123456789012:role/x"
  environment = { variables = {} }
}
resource "aws_s3_bucket_lifecycle_configuration" "l" {
  bucket = "b"
  rule {
    id = "x"
    status = "Enabled"
    expiration { dayz = 1 }
  }
}
resource "aws_nonexistent_thing" "x" {}
`);
    const problems = checkSchema(files);
    const expect = [
      /aws_sqs_queue\.q: unknown argument or block "visibility_timeout_secs"/,
      /aws_sqs_queue\.q: "sqs_managed_sse_enabled" expects true or false/,
      /aws_lambda_function\.f: missing required argument "function_name"/,
      /aws_lambda_function\.f: "environment" is a block/,
      /aws_s3_bucket_lifecycle_configuration\.l\.rule\.expiration: unknown argument or block "dayz"/,
      /no resource type aws_nonexistent_thing/,
    ];
    for (const re of expect) assert.ok(problems.some((p) => re.test(p)), `${re} in ${problems.join('\n')}`);
  });

  it('a valid snippet passes', async () => {
    const files = await hcl(`
variable "n" {
  type = string
}
resource "aws_sqs_queue" "q" {
  name                    = var.n
  sqs_managed_sse_enabled = true
}
output "url" {
  value = aws_sqs_queue.q.url
}
`);
    assert.deepEqual(checkSchema(files), []);
    assert.deepEqual(await checkReferences(files), []);
  });

  it('undeclared symbols, unknown attributes, unindexed instances and unknown functions fail', async () => {
    const files = await hcl(`
variable "used" {
  type = string
}
variable "unused" {
  type = string
}
locals {
  names = [for s in ["a"] : "\${s}-\${var.used}"]
}
resource "aws_sqs_queue" "q" {
  count = 2
  name  = "\${var.missing}-\${count.index}"
  tags  = { x = local.nope, y = upcase("a") }
}
output "a" {
  value = aws_sqs_queue.q.url
}
output "b" {
  value = aws_sqs_queue.q[0].no_such_attribute
}
output "c" {
  value = aws_sns_topic.t.arn
}
output "d" {
  value = [for s in local.names : t]
}
`);
    const problems = await checkReferences(files);
    const expect = [
      /var\.missing: undeclared variable/,
      /local\.nope: undeclared local value/,
      /unknown function upcase\(\)/,
      /aws_sqs_queue\.q has count or for_each; index it/,
      /no_such_attribute is not an attribute/,
      /aws_sns_topic\.t\.arn: undeclared resource/,
      /unknown symbol t/,
      /var\.unused: declared but never used/,
    ];
    for (const re of expect) assert.ok(problems.some((p) => re.test(p)), `${re} in ${problems.join('\n')}`);
    assert.ok(!problems.some((p) => /unknown symbol s\b/.test(p)), 'for-expression variables are bound');
  });
});

describe('terraform: the module', () => {
  let module: Record<string, Hcl>;
  let example: Record<string, Hcl>;
  before(async () => {
    module = (await loadModule(TERRAFORM_DIR)).files;
    example = (await loadModule(EXAMPLE_DIR)).files;
  });

  it('parses, and pins the AWS provider to a major version', () => {
    assert.ok(Object.keys(module).length >= 5);
    const tf = Object.values(module).flatMap((f) => f.terraform ?? []);
    const aws = tf.flatMap((t) => t.required_providers ?? []).map((p) => p.aws).find(Boolean);
    assert.equal(aws?.source, 'hashicorp/aws');
    assert.match(aws?.version ?? '', /^>= 6\.\d+, < 7\.0$/);
    // The schema the checks use is the one the constraint admits.
    const bindings = JSON.parse(fs.readFileSync(require.resolve('@cdktf/provider-aws/package.json'), 'utf8'));
    const readme = fs.readFileSync(path.join(path.dirname(require.resolve('@cdktf/provider-aws/package.json')), 'README.md'), 'utf8');
    const providerVersion = /hashicorp\/aws provider version (\d+\.\d+)\.\d+/.exec(readme)?.[1];
    assert.ok(providerVersion, `provider version of ${bindings.name}`);
    assert.equal(aws.version.split(',')[0], `>= ${providerVersion}`);
  });

  it('every resource and data source matches the AWS provider schema', () => {
    assert.deepEqual(checkSchema(module), []);
    assert.deepEqual(checkSchema(example), []);
  });

  it('every reference resolves, every variable is used', async () => {
    assert.deepEqual(await checkReferences(module), []);
    assert.deepEqual(await checkReferences(example), []);
  });

  it('every variable has a description; the example sets only variables the module declares, and all it requires', () => {
    const vars = blocks(module, 'variable');
    for (const v of vars) assert.ok(typeof v.body.description === 'string' && v.body.description.length > 10, `var.${v.name} description`);
    const call = blocks(example, 'module').find((m) => m.name === 'pipeline')!;
    assert.equal(path.resolve(EXAMPLE_DIR, call.body.source), TERRAFORM_DIR);
    const declared = new Set(vars.map((v) => v.name));
    for (const k of Object.keys(call.body)) if (k !== 'source') assert.ok(declared.has(k), `module argument ${k}`);
    for (const v of vars.filter((v) => !('default' in v.body))) assert.ok(v.name in call.body, `required variable ${v.name}`);
    const sources = call.body.sources as any[];
    assert.equal(sources.length, 2);
    // The example's outputs read outputs the module has.
    const outs = new Set(blocks(module, 'output').map((o) => o.name));
    for (const o of blocks(example, 'output')) assert.ok(outs.has(/module\.pipeline\.(\w+)/.exec(o.body.value)![1]), o.name);
  });

  it('carries cdc-contract/metrics.json unchanged', () => {
    assert.deepEqual(
      JSON.parse(fs.readFileSync(path.join(TERRAFORM_DIR, 'metrics.json'), 'utf8')),
      JSON.parse(fs.readFileSync(path.join(REPO_ROOT, 'cdc-contract', 'metrics.json'), 'utf8')),
    );
    assert.match(String(locals(module).get('metrics')), /jsondecode\(file\("\$\{path\.module\}\/metrics\.json"\)\)/);
    // The dashboard's graphs are built from the catalogue, not from a list of its own.
    assert.match(String(locals(module).get('metric_widgets')), /for m in local\.metrics\.metrics/);
  });

  it('every checkov skip gives its reason', () => {
    for (const f of fs.readdirSync(TERRAFORM_DIR).filter((f) => f.endsWith('.tf'))) {
      for (const line of fs.readFileSync(path.join(TERRAFORM_DIR, f), 'utf8').split('\n')) {
        const m = /#checkov:skip=(\S+?)(?::(.*))?$/.exec(line.trim());
        if (m) assert.ok((m[2] ?? '').length > 30, `${f}: ${m[1]} needs a justification`);
      }
    }
  });
});

// ---- Parity with the CDK stack ------------------------------------------------------------------

/** CloudFormation type -> the Terraform resource types that make it. */
const KINDS: Record<string, string[]> = {
  'AWS::S3::Bucket': ['aws_s3_bucket', 'aws_s3_bucket_ownership_controls', 'aws_s3_bucket_public_access_block', 'aws_s3_bucket_server_side_encryption_configuration', 'aws_s3_bucket_lifecycle_configuration'],
  'AWS::S3::BucketPolicy': ['aws_s3_bucket_policy'],
  'AWS::DynamoDB::Table': ['aws_dynamodb_table'],
  'AWS::SQS::Queue': ['aws_sqs_queue'],
  'AWS::SQS::QueuePolicy': ['aws_sqs_queue_policy'],
  'AWS::EC2::VPC': ['aws_vpc'],
  'AWS::EC2::Subnet': ['aws_subnet'],
  'AWS::EC2::RouteTable': ['aws_route_table'],
  'AWS::EC2::SubnetRouteTableAssociation': ['aws_route_table_association'],
  'AWS::EC2::Route': ['aws_route'],
  'AWS::EC2::InternetGateway': ['aws_internet_gateway'],
  'AWS::EC2::VPCGatewayAttachment': ['aws_internet_gateway'],
  'AWS::EC2::SecurityGroup': ['aws_security_group'],
  'AWS::ECS::Cluster': ['aws_ecs_cluster'],
  'AWS::ECS::ClusterCapacityProviderAssociations': ['aws_ecs_cluster_capacity_providers'],
  'AWS::Logs::LogGroup': ['aws_cloudwatch_log_group'],
  'AWS::IAM::Role': ['aws_iam_role'],
  'AWS::IAM::Policy': ['aws_iam_role_policy'],
  'AWS::ECS::TaskDefinition': ['aws_ecs_task_definition'],
  'AWS::ECS::Service': ['aws_ecs_service'],
  'AWS::SecretsManager::Secret': ['aws_secretsmanager_secret', 'aws_secretsmanager_secret_version'],
  'AWS::Lambda::Function': ['aws_lambda_function'],
  'AWS::Lambda::EventInvokeConfig': ['aws_lambda_function_event_invoke_config'],
  'AWS::Lambda::EventSourceMapping': ['aws_lambda_event_source_mapping'],
  'AWS::Events::Rule': ['aws_cloudwatch_event_rule', 'aws_cloudwatch_event_target'],
  'AWS::Lambda::Permission': ['aws_lambda_permission'],
  'AWS::SNS::Topic': ['aws_sns_topic'],
  'AWS::SNS::TopicPolicy': ['aws_sns_topic_policy'],
  'AWS::SNS::Subscription': ['aws_sns_topic_subscription'],
  'AWS::CloudWatch::Alarm': ['aws_cloudwatch_metric_alarm'],
  'AWS::CloudWatch::Dashboard': ['aws_cloudwatch_dashboard'],
  'AWS::Glue::Database': ['aws_glue_catalog_database'],
  'AWS::Athena::WorkGroup': ['aws_athena_workgroup'],
};
/** Terraform resources with no CloudFormation resource of their own: versioning is a bucket property there. */
const TF_ONLY = new Set(['aws_s3_bucket_versioning']);

const sorted = (xs: Iterable<string>) => [...new Set(xs)].sort();

/** Whether a count, for_each or expression depends on the catalog being on (catalog.tf). */
const onCatalog = (v: unknown): boolean => /\blocal\.catalog_enabled\b/.test(JSON.stringify(v ?? ''));

/**
 * The actions of the statements of a policy document data source, `dynamic` ones included unless
 * `live` rules out their for_each.
 */
function documentActions(body: Hcl, live: (forEach: unknown) => boolean = () => true, effect = 'Allow'): string[] {
  const out: string[] = [];
  const dynamic = (body.dynamic?.statement ?? []).filter((d: any) => live(d.for_each));
  const statements = [...(body.statement ?? []), ...dynamic.flatMap((d: any) => d.content ?? [])];
  for (const s of statements) {
    if ((s.effect ?? 'Allow') !== effect) continue;
    const actions = s.actions;
    if (Array.isArray(actions)) out.push(...actions);
  }
  return out;
}

/** The keys of the map literals in an expression's text (`NAME = ...` after a line start, `{` or `,`). */
const envKeys = (expr: unknown): string[] => [...String(expr).matchAll(/(?:^|[{,])\s*([A-Z][A-Z0-9_]+)\s*=(?!=)/gm)].map((m) => m[1]);

/**
 * The module against the stack of a configuration; with the catalog off, what the module makes
 * only with local.catalog_enabled (resources counted on it, the dynamic IAM statement, the
 * GLUE_DATABASE variable, the alarm) is left out of the comparison, and checked to be all it lacks.
 */
const PARITY: [label: string, config: () => Record<string, any>, catalog: boolean][] = [
  ['config.example.json', exampleConfig, true],
  ['config.example.json with catalog.enabled false', () => ({ ...exampleConfig(), catalog: { enabled: false } }), false],
];

for (const [label, config, catalog] of PARITY) describe(`terraform: parity with the CDK stack (${label})`, () => {
  let s: Synthesized;
  let module: Record<string, Hcl>;
  let ledgerActions: string[];
  before(async () => {
    s = synth(`example-terraform-parity${catalog ? '' : '-no-catalog'}`, config());
    module = (await loadModule(TERRAFORM_DIR)).files;
    ledgerActions = JSON.parse(JSON.stringify(locals(module).get('ledger_actions')));
  });

  /** Whether a block (by its count, for_each) or a dynamic block (by its for_each) exists in this variant. */
  const live = (repeat: unknown) => catalog || !onCatalog(repeat);
  const liveResources = () => blocks(module, 'resource').filter((b) => live(b.body.count ?? b.body.for_each));
  const cdkTypes = () => sorted(Object.values<any>(s.json.Resources).map((r) => r.Type));
  const tfTypes = () => sorted(blocks(module, 'resource').map((b) => b.type));

  it('the same resource kinds', () => {
    for (const t of cdkTypes()) {
      assert.ok(KINDS[t], `no Terraform counterpart known for ${t}`);
      for (const tf of KINDS[t]) assert.ok(tfTypes().includes(tf), `${t}: ${tf} missing from the module`);
    }
    const mapped = new Set(Object.values(KINDS).flat());
    for (const t of tfTypes()) assert.ok(mapped.has(t) || TF_ONLY.has(t), `${t} has no CloudFormation counterpart`);
    // The buckets, their policies, the Glue database and the workgroup, one for one.
    const count = (cfn: string) => Object.values<any>(s.json.Resources).filter((r) => r.Type === cfn).length;
    for (const [cfn, tf] of [
      ['AWS::S3::Bucket', 'aws_s3_bucket'],
      ['AWS::S3::BucketPolicy', 'aws_s3_bucket_policy'],
      ['AWS::Glue::Database', 'aws_glue_catalog_database'],
      ['AWS::Athena::WorkGroup', 'aws_athena_workgroup'],
    ]) {
      assert.equal(liveResources().filter((b) => b.type === tf).length, count(cfn), `${cfn} vs ${tf}`);
    }
    // Everything of the catalog hangs on local.catalog_enabled, so catalog.enabled false removes it all.
    for (const b of blocks(module, 'resource').filter((b) => ['aws_glue_catalog_database', 'aws_athena_workgroup'].includes(b.type) || b.name === 'athena_results')) {
      assert.ok(onCatalog(b.body.count), `${b.type}.${b.name} is counted on local.catalog_enabled`);
    }
  });

  it('the same IAM actions per role', () => {
    const statements = iamStatements(s.json);
    const cdkActions = (role: string, effect = 'Allow') => sorted(statements.filter((st) => st.roles.includes(role) && st.effect === effect).flatMap((st) => st.actions));
    const doc = (name: string) => blocks(module, 'data').find((b) => b.type === 'aws_iam_policy_document' && b.name === name)!.body;
    const resolve = (actions: string[]) => actions.flatMap((a) => (a === '${local.ledger_actions}' ? ledgerActions : [a]));
    const tfActions = (name: string) => {
      const body = doc(name);
      const out = [...documentActions(body, live)];
      // `actions = local.ledger_actions` is an expression: resolve it from the local.
      for (const st of body.statement ?? []) if (typeof st.actions === 'string') out.push(...resolve([st.actions]));
      return sorted(resolve(out));
    };
    const cases: [string, string][] = [
      [logicalId(s.json, 'AWS::IAM::Role', 'CompactorRole'), 'compactor'],
      [logicalId(s.json, 'AWS::IAM::Role', 'CaptureordersTaskTaskRole'), 'capture_task'],
      [logicalId(s.json, 'AWS::IAM::Role', 'CaptureordersTaskExecutionRole'), 'capture_execution'],
    ];
    for (const [role, docName] of cases) {
      const tf = tfActions(docName);
      // kms:Decrypt is granted only for a source whose secret has a customer-managed key, as in the CDK app.
      assert.deepEqual(tf.filter((a) => a !== 'kms:Decrypt'), cdkActions(role), `${role} vs data.aws_iam_policy_document.${docName}`);
      // And the same explicit denials (the compactor's on staged objects).
      assert.deepEqual(sorted(documentActions(doc(docName), live, 'Deny')), cdkActions(role, 'Deny'), `${role} denials vs data.aws_iam_policy_document.${docName}`);
    }
    // Every role policy attaches one of these documents.
    for (const b of blocks(module, 'resource').filter((b) => b.type === 'aws_iam_role_policy')) {
      assert.match(b.body.policy, /^\$\{data\.aws_iam_policy_document\.(compactor|capture_task|capture_execution)(\[each\.key\])?\.json\}$/, b.name);
    }
  });

  it('the same environment variables for the capture and the compactor', () => {
    const task = logicalId(s.json, 'AWS::ECS::TaskDefinition', 'CaptureordersTask');
    const cdkCapture = (s.json.Resources[task].Properties.ContainerDefinitions[0].Environment as any[]).map((e) => e.Name);
    assert.deepEqual(sorted(envKeys(locals(module).get('capture_environment'))), sorted(cdkCapture));
    const fn = logicalId(s.json, 'AWS::Lambda::Function', 'Compactor');
    const cdkCompactor = Object.keys(s.json.Resources[fn].Properties.Environment.Variables);
    // CDC_SLOT_NAME is set only with compactor.slotFilter, GLUE_DATABASE only with the catalog, in both.
    const conditional = ['CDC_SLOT_NAME', ...(catalog ? [] : ['GLUE_DATABASE'])];
    assert.deepEqual(sorted(envKeys(locals(module).get('compactor_environment'))), sorted([...cdkCompactor, ...conditional]));
    assert.match(String(locals(module).get('compactor_environment')), /local\.catalog_enabled \? \{ GLUE_DATABASE = /);
    const secrets = s.json.Resources[task].Properties.ContainerDefinitions[0].Secrets.map((x: any) => x.Name);
    const def = blocks(module, 'resource').find((b) => b.type === 'aws_ecs_task_definition')!.body.container_definitions;
    for (const name of secrets) assert.match(def, new RegExp(`name = "${name}"`));
  });

  it('the same alarms: metric, namespace, statistic, comparison, missing-data treatment', () => {
    const key = (a: Record<string, unknown>) => [a.namespace, a.metric, a.statistic, a.comparison, a.missing].join(' ');
    const namespace = JSON.parse(fs.readFileSync(path.join(TERRAFORM_DIR, 'metrics.json'), 'utf8')).namespace;
    const cdk = Object.values<any>(s.json.Resources)
      .filter((r) => r.Type === 'AWS::CloudWatch::Alarm')
      .map((r) => r.Properties)
      .filter((p) => p.Dimensions[0].Name !== 'Slot' || p.Dimensions[0].Value === 'cdc_orders')
      .map((p) => key({ namespace: p.Namespace, metric: p.MetricName, statistic: p.Statistic, comparison: p.ComparisonOperator, missing: p.TreatMissingData }));
    const tf = liveResources()
      .filter((b) => b.type === 'aws_cloudwatch_metric_alarm')
      .map((b) => b.body)
      .map((p) => key({
        namespace: p.namespace === '${local.namespace}' ? namespace : p.namespace,
        metric: p.metric_name,
        statistic: p.statistic,
        comparison: p.comparison_operator,
        missing: p.treat_missing_data,
      }));
    assert.deepEqual(tf.sort(), cdk.sort());
    // Per-source alarms are per source, on the slot dimension (the catalog's only with the catalog).
    for (const b of blocks(module, 'resource').filter((b) => b.type === 'aws_cloudwatch_metric_alarm' && b.body.namespace === '${local.namespace}')) {
      assert.ok(['${local.sources}', '${local.catalog_enabled ? local.sources : {}}'].includes(b.body.for_each), b.name);
    }
  });

  it('the same outputs', () => {
    const tf = new Set(blocks(module, 'output').map((o) => o.name));
    const perSource = ['CaptureService', 'CaptureLogGroup', 'PasswordSecret'];
    for (const name of Object.keys(s.json.Outputs)) {
      const prefix = perSource.find((p) => name.startsWith(p) && name !== p);
      assert.ok(tf.has(prefix ?? name), `output ${name}`);
    }
    // The catalog's outputs are null without it; the CDK stack has none then.
    const catalogOutputs = blocks(module, 'output').filter((o) => /aws_(glue_catalog_database|athena_workgroup|s3_bucket\.athena_results)\b/.test(o.body.value)).map((o) => o.name);
    assert.deepEqual(sorted(catalogOutputs), ['AthenaResultsBucketName', 'AthenaWorkGroupName', 'GlueDatabaseName']);
    for (const name of tf) {
      const absent = perSource.includes(name) || (!catalog && catalogOutputs.includes(name));
      assert.ok(absent || name in s.json.Outputs, `output ${name} is not the CDK stack's`);
    }
  });
});
