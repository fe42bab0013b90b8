// The metric catalogue the Rust code emits (cdc-contract/metrics.json), read at synth time so the
// dashboard and the alarms can never name a metric the code does not emit.

import * as fs from 'node:fs';
import * as path from 'node:path';
import { REPO_ROOT } from './config';

export interface MetricDef {
  name: string;
  unit: string;
  emitter: 'capture' | 'compactor';
  description: string;
}

export interface MetricCatalogue {
  namespace: string;
  /** The pipeline-level dimension; its value is the slot name. */
  dimension: string;
  /** The opt-in per-table dimension. */
  tableDimension: string;
  metrics: MetricDef[];
}

export const METRICS_FILE = path.join(REPO_ROOT, 'cdc-contract', 'metrics.json');

export function loadMetrics(file: string = METRICS_FILE): MetricCatalogue {
  const raw = JSON.parse(fs.readFileSync(file, 'utf8')) as Record<string, unknown>;
  const fail = (what: string): never => {
    throw new Error(`${file}: ${what}`);
  };
  if (typeof raw.namespace !== 'string' || raw.namespace === '') fail('namespace is missing');
  if (typeof raw.dimension !== 'string' || raw.dimension === '') fail('dimension is missing');
  if (!Array.isArray(raw.metrics) || raw.metrics.length === 0) fail('metrics is missing');
  const metrics = (raw.metrics as Record<string, unknown>[]).map((m, i) => {
    if (typeof m.name !== 'string' || !/^[A-Za-z0-9]+$/.test(m.name)) fail(`metrics[${i}].name is invalid`);
    if (m.emitter !== 'capture' && m.emitter !== 'compactor') fail(`metrics[${i}].emitter must be capture or compactor`);
    if (typeof m.unit !== 'string') fail(`metrics[${i}].unit is missing`);
    return {
      name: m.name as string,
      unit: m.unit as string,
      emitter: m.emitter as 'capture' | 'compactor',
      description: typeof m.description === 'string' ? m.description : '',
    };
  });
  if (new Set(metrics.map((m) => m.name)).size !== metrics.length) fail('a metric name appears twice');
  return {
    namespace: raw.namespace as string,
    dimension: raw.dimension as string,
    tableDimension: typeof raw.table_dimension === 'string' ? raw.table_dimension : 'Table',
    metrics,
  };
}

/**
 * The statistic a graph shows for a metric: gauges (lag, WAL, pending work) their worst value,
 * per-event counts and sizes their sum, latencies and durations a high percentile.
 */
export function statisticFor(m: MetricDef): string {
  if (/Lag|Wal|Pending/.test(m.name)) return m.name === 'SlotSafeWalBytes' ? 'Minimum' : 'Maximum';
  if (m.unit === 'Milliseconds' || m.unit === 'Seconds') return 'p99';
  return 'Sum';
}
