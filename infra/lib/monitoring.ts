// The dashboard (a graph for every metric in metrics.json, per slot, plus the AWS metrics that
// show the pipeline's health) and the alarms.

import { Duration } from 'aws-cdk-lib';
import * as cloudwatch from 'aws-cdk-lib/aws-cloudwatch';
import * as cwActions from 'aws-cdk-lib/aws-cloudwatch-actions';
import * as ecs from 'aws-cdk-lib/aws-ecs';
import * as lambda from 'aws-cdk-lib/aws-lambda';
import * as sns from 'aws-cdk-lib/aws-sns';
import * as subscriptions from 'aws-cdk-lib/aws-sns-subscriptions';
import * as sqs from 'aws-cdk-lib/aws-sqs';
import { Construct } from 'constructs';
import { PipelineConfig, SourceConfig } from './config';
import { MetricCatalogue, statisticFor } from './metrics';

const PERIOD = Duration.minutes(5);

export interface MonitoringProps {
  config: PipelineConfig;
  catalogue: MetricCatalogue;
  services: { source: SourceConfig; service: ecs.FargateService }[];
  compactor: lambda.IFunction;
  notifyQueue: sqs.IQueue;
  notifyDeadLetterQueue: sqs.IQueue;
  deadLetterNotices: sqs.IQueue;
}

export class Monitoring extends Construct {
  readonly dashboard: cloudwatch.Dashboard;
  readonly alarms: cloudwatch.Alarm[] = [];
  readonly topic?: sns.Topic;

  constructor(scope: Construct, id: string, props: MonitoringProps) {
    super(scope, id);
    const { config, catalogue } = props;
    const sources = props.services.map((s) => s.source);

    const pipelineMetric = (name: string, slot: string, statistic: string, label?: string): cloudwatch.Metric =>
      new cloudwatch.Metric({
        namespace: catalogue.namespace,
        metricName: name,
        dimensionsMap: { [catalogue.dimension]: slot },
        statistic,
        period: PERIOD,
        label,
      });

    if (config.alarms.email) {
      this.topic = new sns.Topic(this, 'AlarmTopic', {
        displayName: `${config.stackName} alarms`,
        enforceSSL: true,
      });
      this.topic.addSubscription(new subscriptions.EmailSubscription(config.alarms.email));
      // No KMS key: alarm notifications carry no data, CloudWatch cannot publish to a topic under the
      // AWS-managed SNS key, and a customer-managed key costs $1/month at rest.
    }

    const alarm = (alarmId: string, p: cloudwatch.AlarmProps): cloudwatch.Alarm => {
      const a = new cloudwatch.Alarm(this, alarmId, p);
      if (this.topic) {
        a.addAlarmAction(new cwActions.SnsAction(this.topic));
        a.addOkAction(new cwActions.SnsAction(this.topic));
      }
      this.alarms.push(a);
      return a;
    };

    for (const s of sources) {
      alarm(`${s.name}ReplicationLag`, {
        alarmName: `${config.stackName}-${s.name}-replication-lag`,
        alarmDescription: `Capture ${s.name} (slot ${s.slotName}) is more than ${s.lagAlarmSeconds} s behind the database.`,
        metric: pipelineMetric('ReplicationLagSeconds', s.slotName, 'Maximum'),
        threshold: s.lagAlarmSeconds,
        comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
        evaluationPeriods: 1,
        // A capture that reports nothing is the CaptureDown alarm's business.
        treatMissingData: cloudwatch.TreatMissingData.NOT_BREACHING,
      });
      const periods = config.alarms.captureDownMinutes / 5;
      alarm(`${s.name}CaptureDown`, {
        alarmName: `${config.stackName}-${s.name}-capture-down`,
        alarmDescription:
          `Capture ${s.name} (slot ${s.slotName}) reported no ReplicationLagSeconds for ` +
          `${config.alarms.captureDownMinutes} minutes: the task is down, crash-looping or cannot reach the database.`,
        // The capture reports its lag at every heartbeat (30 s by default): silence means it is down.
        // This costs one alarm instead of Container Insights' per-task metrics.
        metric: pipelineMetric('ReplicationLagSeconds', s.slotName, 'SampleCount'),
        threshold: 1,
        comparisonOperator: cloudwatch.ComparisonOperator.LESS_THAN_THRESHOLD,
        evaluationPeriods: periods,
        datapointsToAlarm: periods,
        treatMissingData: cloudwatch.TreatMissingData.BREACHING,
      });
      alarm(`${s.name}PendingHourAge`, {
        alarmName: `${config.stackName}-${s.name}-pending-hour-age`,
        alarmDescription:
          `A closed table-hour of ${s.name} (slot ${s.slotName}) has waited more than ${config.alarms.pendingHourAgeSeconds} s ` +
          'past its end for compaction: an hour fails (see the compactor log and its Errors alarm) or the capture stopped closing hours.',
        metric: pipelineMetric('OldestPendingHourAge', s.slotName, 'Maximum'),
        threshold: config.alarms.pendingHourAgeSeconds,
        comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
        evaluationPeriods: 1,
        treatMissingData: cloudwatch.TreatMissingData.NOT_BREACHING,
      });
      alarm(`${s.name}SlotWal`, {
        alarmName: `${config.stackName}-${s.name}-slot-wal`,
        alarmDescription:
          `The replication slot ${s.slotName} of ${s.name} is unreserved or lost (wal_status): changes ` +
          'will be or are gone from the server; the capture must catch up or the slot be recreated.',
        metric: pipelineMetric('SlotWalLost', s.slotName, 'Maximum'),
        threshold: 1,
        comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_OR_EQUAL_TO_THRESHOLD,
        evaluationPeriods: 1,
        treatMissingData: cloudwatch.TreatMissingData.NOT_BREACHING,
      });
      if (config.catalog.enabled) {
        alarm(`${s.name}CatalogUpdates`, {
          alarmName: `${config.stackName}-${s.name}-catalog-updates`,
          alarmDescription:
            `The compactor failed to create or update Glue tables of ${s.name} (slot ${s.slotName}) in the database ` +
            `${config.catalog.databaseName} after its retries: compaction goes on, but Athena may not see new ` +
            'tables or columns; see the compactor log.',
          metric: pipelineMetric('CatalogUpdateFailures', s.slotName, 'Sum'),
          threshold: 0,
          comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
          // Any failure alarms (each is one after retries), and the alarm clears only after three
          // periods without one: a lasting failure recurs at the next runs (the compactor tries a
          // failed update again at its next sweep and at each compaction of the table) and holds
          // the alarm instead of flapping. The metric is emitted only on failure.
          evaluationPeriods: 3,
          datapointsToAlarm: 1,
          treatMissingData: cloudwatch.TreatMissingData.NOT_BREACHING,
        });
      }
    }

    const depth = (q: sqs.IQueue, label?: string) =>
      q.metricApproximateNumberOfMessagesVisible({ statistic: 'Maximum', period: PERIOD, label });
    alarm('NotifyDeadLetters', {
      alarmName: `${config.stackName}-notification-dlq`,
      alarmDescription:
        'Notifications the compactor failed on repeatedly are in the dead-letter queue. Nothing is lost ' +
        '(the scheduled sweep compacts what the ledger holds) but the compactor keeps failing.',
      metric: depth(props.notifyDeadLetterQueue),
      threshold: 0,
      comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
      evaluationPeriods: 1,
      treatMissingData: cloudwatch.TreatMissingData.NOT_BREACHING,
    });
    alarm('DeadLetterRecords', {
      alarmName: `${config.stackName}-dead-letter-records`,
      alarmDescription:
        'The compactor found staged records it cannot read and moved them to the _dead_letter/ prefix; ' +
        'the notices queue names them.',
      metric: depth(props.deadLetterNotices),
      threshold: 0,
      comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
      evaluationPeriods: 1,
      treatMissingData: cloudwatch.TreatMissingData.NOT_BREACHING,
    });
    alarm('CompactorErrors', {
      alarmName: `${config.stackName}-compactor-errors`,
      alarmDescription: 'The compactor Lambda failed (error or timeout); see its log group.',
      metric: props.compactor.metricErrors({ statistic: 'Sum', period: PERIOD }),
      threshold: 0,
      comparisonOperator: cloudwatch.ComparisonOperator.GREATER_THAN_THRESHOLD,
      evaluationPeriods: 1,
      treatMissingData: cloudwatch.TreatMissingData.NOT_BREACHING,
    });

    // Dashboard: the pipeline's own metrics first, one graph per metric, one line per slot. The
    // compactor reports per slot too, so its graphs have the same lines.
    const widgets: cloudwatch.IWidget[] = [
      new cloudwatch.TextWidget({
        markdown:
          `# ${config.stackName}: PostgreSQL change data capture to S3\n` +
          `Namespace \`${catalogue.namespace}\`, one line per slot (dimension \`${catalogue.dimension}\`): ` +
          sources.map((s) => `${s.name} = \`${s.slotName}\``).join(', '),
        width: 24,
        height: 2,
      }),
      new cloudwatch.AlarmStatusWidget({ title: 'Alarms', alarms: this.alarms, width: 24, height: 3 }),
    ];
    for (const m of catalogue.metrics) {
      const statistic = statisticFor(m);
      widgets.push(
        new cloudwatch.GraphWidget({
          title: `${m.name} (${m.emitter}, ${statistic})`,
          left: sources.map((s) => pipelineMetric(m.name, s.slotName, statistic, s.name)),
          leftYAxis: { label: m.unit, showUnits: false, min: 0 },
          width: 8,
          height: 6,
        }),
      );
    }
    widgets.push(
      new cloudwatch.GraphWidget({
        title: 'Compactor invocations, errors and throttles',
        left: [
          props.compactor.metricInvocations({ statistic: 'Sum', period: PERIOD }),
          props.compactor.metricErrors({ statistic: 'Sum', period: PERIOD }),
          props.compactor.metricThrottles({ statistic: 'Sum', period: PERIOD }),
        ],
        width: 8,
        height: 6,
      }),
      new cloudwatch.GraphWidget({
        title: 'Compactor duration (p99, max)',
        left: [
          props.compactor.metricDuration({ statistic: 'p99', period: PERIOD }),
          props.compactor.metricDuration({ statistic: 'Maximum', period: PERIOD }),
        ],
        leftAnnotations: [{ value: config.compactor.timeoutSeconds * 1000, label: 'timeout' }],
        width: 8,
        height: 6,
      }),
      new cloudwatch.GraphWidget({
        title: 'Dead-letter queues (messages visible)',
        left: [depth(props.notifyDeadLetterQueue, 'notification DLQ'), depth(props.deadLetterNotices, 'dead-letter notices')],
        width: 8,
        height: 6,
      }),
      new cloudwatch.GraphWidget({
        title: 'Notification queue',
        left: [depth(props.notifyQueue, 'visible')],
        right: [
          props.notifyQueue.metricApproximateAgeOfOldestMessage({ statistic: 'Maximum', period: PERIOD, label: 'oldest (s)' }),
        ],
        width: 8,
        height: 6,
      }),
      new cloudwatch.GraphWidget({
        title: 'Capture CPU utilization (%)',
        left: props.services.map(({ source, service }) =>
          service.metricCpuUtilization({ statistic: 'Maximum', period: PERIOD, label: source.name }),
        ),
        leftYAxis: { min: 0, max: 100 },
        width: 8,
        height: 6,
      }),
      new cloudwatch.GraphWidget({
        title: 'Capture memory utilization (%)',
        left: props.services.map(({ source, service }) =>
          service.metricMemoryUtilization({ statistic: 'Maximum', period: PERIOD, label: source.name }),
        ),
        leftYAxis: { min: 0, max: 100 },
        width: 8,
        height: 6,
      }),
    );

    this.dashboard = new cloudwatch.Dashboard(this, 'Dashboard', {
      dashboardName: config.stackName,
      defaultInterval: Duration.hours(12),
      widgets: [widgets],
    });
  }
}
