// Shared by the tests: a dummy compactor zip (so no test needs cargo), configurations, a synth
// helper with cdk.json's feature flags, and helpers to read intrinsic-laden template values.

import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { App, Aspects } from 'aws-cdk-lib';
import { Template } from 'aws-cdk-lib/assertions';
import { AwsSolutionsChecks } from 'cdk-nag';
import { INFRA_DIR, parseConfig } from '../lib/config';
import { MetricCatalogue } from '../lib/metrics';
import { PipelineStack } from '../lib/pipeline-stack';

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

function crc32(buf: Buffer): number {
  let c = 0xffffffff;
  for (const b of buf) c = CRC_TABLE[(c ^ b) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

/** A zip (stored, no compression) holding one file, as cargo-lambda's bootstrap.zip does. */
export function writeZip(file: string, name: string, content: Buffer): void {
  const nameBuf = Buffer.from(name);
  const crc = crc32(content);
  const local = Buffer.alloc(30);
  local.writeUInt32LE(0x04034b50, 0);
  local.writeUInt16LE(20, 4); // version needed
  local.writeUInt16LE(0, 6); // flags
  local.writeUInt16LE(0, 8); // stored
  local.writeUInt32LE(0, 10); // time, date
  local.writeUInt32LE(crc, 14);
  local.writeUInt32LE(content.length, 18);
  local.writeUInt32LE(content.length, 22);
  local.writeUInt16LE(nameBuf.length, 26);
  local.writeUInt16LE(0, 28);
  const central = Buffer.alloc(46);
  central.writeUInt32LE(0x02014b50, 0);
  central.writeUInt16LE((3 << 8) | 20, 4); // made by: unix
  central.writeUInt16LE(20, 6);
  central.writeUInt16LE(0, 8);
  central.writeUInt16LE(0, 10);
  central.writeUInt32LE(0, 12);
  central.writeUInt32LE(crc, 16);
  central.writeUInt32LE(content.length, 20);
  central.writeUInt32LE(content.length, 24);
  central.writeUInt16LE(nameBuf.length, 28);
  central.writeUInt32LE(0, 30); // extra, comment lengths
  central.writeUInt32LE(0, 34); // disk, internal attributes
  central.writeUInt32LE(((0o100755 << 16) >>> 0), 38); // external attributes: executable file
  central.writeUInt32LE(0, 42); // local header offset
  const localSize = local.length + nameBuf.length + content.length;
  const centralSize = central.length + nameBuf.length;
  const end = Buffer.alloc(22);
  end.writeUInt32LE(0x06054b50, 0);
  end.writeUInt16LE(1, 8);
  end.writeUInt16LE(1, 10);
  end.writeUInt32LE(centralSize, 12);
  end.writeUInt32LE(localSize, 16);
  fs.writeFileSync(file, Buffer.concat([local, nameBuf, content, central, nameBuf, end]));
}

/** A temp dir removed when the process exits. */
export function tempDir(prefix: string): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  process.on('exit', () => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

let zip: string | undefined;
/** The dummy compactor zip: `bootstrap` only, created once per test process. */
export function dummyCompactorZip(): string {
  if (!zip) {
    zip = path.join(tempDir('pgcdc-zip-'), 'bootstrap.zip');
    writeZip(zip, 'bootstrap', Buffer.from('#!/bin/sh\necho not the real compactor\n'));
  }
  return zip;
}

/** config.example.json, with the dummy zip. */
export function exampleConfig(): Record<string, any> {
  const raw = JSON.parse(fs.readFileSync(path.join(INFRA_DIR, 'config.example.json'), 'utf8'));
  raw.compactor = { ...raw.compactor, asset: dummyCompactorZip() };
  return raw;
}

/** One source, nothing optional, with the dummy zip. */
export function minimalConfig(): Record<string, any> {
  return {
    compactor: { asset: dummyCompactorZip() },
    sources: [{ name: 'app', host: 'db.example.com', database: 'app', user: 'cdc_user', slotName: 'cdc_app' }],
  };
}

/** cdk.json's context: the feature flags the CLI app runs with. */
export function cdkJsonContext(): Record<string, unknown> {
  return JSON.parse(fs.readFileSync(path.join(INFRA_DIR, 'cdk.json'), 'utf8')).context ?? {};
}

export interface Synthesized {
  app: App;
  stack: PipelineStack;
  template: Template;
  json: any;
  outdir: string;
}

/**
 * Synthesizes a PipelineStack from a raw configuration (validated like the app's), optionally with
 * cdk-nag's AwsSolutions pack. With PGCDC_TEMPLATE_DIR set, the template is also written there as
 * `{label}.template.json` (test.sh runs cfn-lint on every variant the tests build).
 */
export function synth(label: string, raw: unknown, opts: { nag?: boolean; metrics?: MetricCatalogue } = {}): Synthesized {
  const config = parseConfig(raw);
  const outdir = tempDir('pgcdc-cdkout-');
  const app = new App({ outdir, context: cdkJsonContext() });
  const stack = new PipelineStack(app, config.stackName, { config, metrics: opts.metrics });
  if (opts.nag) Aspects.of(app).add(new AwsSolutionsChecks({ verbose: true }));
  const template = Template.fromStack(stack);
  const json = template.toJSON();
  const dir = process.env.PGCDC_TEMPLATE_DIR;
  if (dir) {
    fs.mkdirSync(dir, { recursive: true });
    fs.writeFileSync(path.join(dir, `${label}.template.json`), JSON.stringify(json, null, 1));
  }
  return { app, stack, template, json, outdir };
}

/** Renders a CloudFormation value to a string: Ref and GetAtt as <Id> and <Id.Attr>. */
export function render(v: unknown): string {
  if (typeof v === 'string') return v;
  if (typeof v === 'number' || typeof v === 'boolean') return String(v);
  if (v && typeof v === 'object') {
    const o = v as Record<string, any>;
    if ('Fn::Join' in o) return (o['Fn::Join'][1] as unknown[]).map(render).join(o['Fn::Join'][0]);
    if ('Ref' in o) return `<${o.Ref}>`;
    if ('Fn::GetAtt' in o) return `<${(o['Fn::GetAtt'] as string[]).join('.')}>`;
    if ('Fn::Sub' in o) return String(o['Fn::Sub']);
    if ('Fn::Select' in o) return `<select>`;
  }
  return `<${JSON.stringify(v)}>`;
}

export interface Statement {
  /** The policy's or role's logical id. */
  owner: string;
  /** The roles the policy is attached to (logical ids). */
  roles: string[];
  effect: string;
  actions: string[];
  resources: string[];
  condition?: unknown;
}

const asList = <T>(v: T | T[] | undefined): T[] => (v === undefined ? [] : Array.isArray(v) ? v : [v]);

/** Every IAM statement of the template: AWS::IAM::Policy documents and roles' inline policies. */
export function iamStatements(json: any): Statement[] {
  const out: Statement[] = [];
  for (const [id, r] of Object.entries<any>(json.Resources)) {
    const docs: { doc: any; roles: string[] }[] = [];
    if (r.Type === 'AWS::IAM::Policy') {
      docs.push({ doc: r.Properties.PolicyDocument, roles: asList(r.Properties.Roles).map((x: any) => x.Ref) });
    }
    if (r.Type === 'AWS::IAM::Role') {
      for (const p of asList<any>(r.Properties.Policies)) docs.push({ doc: p.PolicyDocument, roles: [id] });
    }
    for (const { doc, roles } of docs) {
      for (const s of asList<any>(doc.Statement)) {
        out.push({
          owner: id,
          roles,
          effect: s.Effect,
          actions: asList<string>(s.Action),
          resources: asList<unknown>(s.Resource).map(render),
          condition: s.Condition,
        });
      }
    }
  }
  return out;
}

/** The logical id of the single resource of a type whose id starts with a prefix. */
export function logicalId(json: any, type: string, prefix: string): string {
  const ids = Object.keys(json.Resources).filter((k) => json.Resources[k].Type === type && k.startsWith(prefix));
  if (ids.length !== 1) throw new Error(`expected one ${type} ${prefix}*, found ${ids.join(', ') || 'none'}`);
  return ids[0];
}

/** The container's environment of a task definition as a map. */
export function containerEnv(json: any, taskId: string): Record<string, string> {
  const c = json.Resources[taskId].Properties.ContainerDefinitions[0];
  return Object.fromEntries((c.Environment as any[]).map((e) => [e.Name, render(e.Value)]));
}

/** The dashboard body, parsed (tokens rendered as <...>). */
export function dashboardBody(json: any): any {
  const id = logicalId(json, 'AWS::CloudWatch::Dashboard', 'Monitoring');
  return JSON.parse(render(json.Resources[id].Properties.DashboardBody));
}

/** [namespace, metricName, ...dimension name/value pairs] of every metric line of every graph. */
export function dashboardMetrics(body: any): { namespace: string; name: string; dims: Record<string, string> }[] {
  const out: { namespace: string; name: string; dims: Record<string, string> }[] = [];
  for (const w of body.widgets) {
    if (w.type !== 'metric') continue;
    let prev: string[] = [];
    for (const line of w.properties.metrics ?? []) {
      // CloudWatch's shorthand: "." repeats the value at the same position in the previous line.
      const parts: string[] = [];
      for (const [i, p] of (line as unknown[]).entries()) {
        if (typeof p === 'object') break;
        parts.push(p === '.' ? prev[i] : (p as string));
      }
      prev = parts;
      const [namespace, name, ...rest] = parts;
      const dims: Record<string, string> = {};
      for (let i = 0; i + 1 < rest.length; i += 2) dims[rest[i]] = rest[i + 1];
      out.push({ namespace, name, dims });
    }
  }
  return out;
}
