#!/usr/bin/env node
// The CDK app: one PipelineStack configured by `-c config=FILE` (or the `pgcdc` context object),
// checked against cdk-nag's AwsSolutions rules at every synth.
import { App, Aspects } from 'aws-cdk-lib';
import { AwsSolutionsChecks } from 'cdk-nag';
import { ConfigError, loadConfig } from '../lib/config';
import { PipelineStack } from '../lib/pipeline-stack';

const app = new App();
try {
  const config = loadConfig(app.node);
  new PipelineStack(app, config.stackName, {
    config,
    env: config.account || config.region ? { account: config.account, region: config.region } : undefined,
    description: 'PostgreSQL change data capture to S3 (capture on ECS Fargate, compactor on Lambda)',
  });
} catch (e) {
  if (e instanceof ConfigError) {
    console.error(e.message);
    process.exit(1);
  }
  throw e;
}
Aspects.of(app).add(new AwsSolutionsChecks({ verbose: true }));
app.synth();
