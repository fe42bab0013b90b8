// The dashboard shows exactly the metrics of cdc-contract/metrics.json (the file the Rust code
// checks its metric constants against), per slot, plus the AWS metrics of the pipeline's health.

import assert from 'node:assert/strict';
import { before, describe, it } from 'node:test';
import { loadMetrics, METRICS_FILE } from '../lib/metrics';
import { dashboardBody, dashboardMetrics, exampleConfig, logicalId, synth, Synthesized } from './helpers';

describe('dashboard', () => {
  const catalogue = loadMetrics();
  let s: Synthesized;
  let body: any;
  before(() => {
    s = synth('example-dashboard', exampleConfig());
    body = dashboardBody(s.json);
  });

  it(`the metric names it shows equal the set in ${METRICS_FILE.split('/').slice(-2).join('/')}`, () => {
    const shown = new Set(dashboardMetrics(body).filter((m) => m.namespace === catalogue.namespace).map((m) => m.name));
    const defined = new Set(catalogue.metrics.map((m) => m.name));
    assert.ok(defined.size >= 1);
    assert.deepEqual([...shown].sort(), [...defined].sort());
  });

  it('a graph for every metric, one line per slot with the Slot dimension', () => {
    const graphs = body.widgets.filter((w: any) => w.type === 'metric');
    for (const m of catalogue.metrics) {
      const widget = graphs.filter((w: any) => w.properties.title.startsWith(`${m.name} `));
      assert.equal(widget.length, 1, m.name);
      const lines = dashboardMetrics({ widgets: widget });
      assert.deepEqual(
        lines.map((l) => [l.namespace, l.name, JSON.stringify(l.dims)]).sort(),
        ['cdc_billing', 'cdc_orders'].map((slot) => [catalogue.namespace, m.name, JSON.stringify({ [catalogue.dimension]: slot })]),
        m.name,
      );
    }
  });

  it('compactor errors and throttles, dead-letter queue depth, capture CPU and memory', () => {
    const lines = dashboardMetrics(body);
    const has = (ns: string, name: string) => lines.some((l) => l.namespace === ns && l.name === name);
    for (const name of ['Errors', 'Throttles', 'Invocations', 'Duration']) assert.ok(has('AWS/Lambda', name), name);
    const depth = lines.filter((l) => l.namespace === 'AWS/SQS' && l.name === 'ApproximateNumberOfMessagesVisible');
    const dlq = logicalId(s.json, 'AWS::SQS::Queue', 'NotifyDeadLetterQueue');
    const notices = logicalId(s.json, 'AWS::SQS::Queue', 'DeadLetterNotices');
    for (const q of [dlq, notices]) assert.ok(depth.some((l) => l.dims.QueueName === `<${q}.QueueName>`), q);
    for (const name of ['CPUUtilization', 'MemoryUtilization']) {
      assert.equal(lines.filter((l) => l.namespace === 'AWS/ECS' && l.name === name).length, 2, name);
    }
  });

  it('an alarm status widget', () => {
    const alarms = body.widgets.filter((w: any) => w.type === 'alarm');
    assert.equal(alarms.length, 1);
    assert.equal(alarms[0].properties.alarms.length, 13, '5 per source (2; the catalog\'s included) and 3 for the pipeline');
  });

  it('follows metrics.json: a metric added there appears without a code change', () => {
    const extra = {
      ...catalogue,
      metrics: [...catalogue.metrics, { name: 'SomethingNew', unit: 'Count', emitter: 'compactor' as const, description: 'x' }],
    };
    const t = synth('extra-metric', exampleConfig(), { metrics: extra });
    const shown = new Set(dashboardMetrics(dashboardBody(t.json)).map((m) => m.name));
    assert.ok(shown.has('SomethingNew'));
  });
});
