// Offline checks of the Terraform module (infra/terraform): HCL parsed by HashiCorp's hcl2json,
// every resource and data source checked against the AWS provider's schema as the
// @cdktf/provider-aws bindings carry it (argument names, blocks, types, required arguments,
// exported attributes), and every reference resolved (variables, locals, resources, data
// sources, attributes, iteration symbols, functions).

import * as fs from 'node:fs';
import * as path from 'node:path';
import { getExpressionAst, parse } from '@cdktf/hcl2json';
import { INFRA_DIR } from '../lib/config';

export const TERRAFORM_DIR = path.join(INFRA_DIR, 'terraform');
const PROVIDER_LIB = path.join(path.dirname(require.resolve('@cdktf/provider-aws/package.json')), 'lib');

// ---- The provider's schema ---------------------------------------------------------------------

export interface ArgSchema {
  name: string;
  /** Written as a nested block (`name { ... }`), not as an argument (`name = ...`). */
  block: boolean;
  /** simple, list, set, map or struct. */
  kind: string;
  /** string, number, boolean, stringList, stringMap, ... or a nested struct's class name. */
  storage: string;
  required: boolean;
  /** The nested schema of a block or an object-typed argument. */
  nested?: BlockSchema;
}

export interface BlockSchema {
  args: Map<string, ArgSchema>;
  /** Attributes a reference may read (arguments and exported attributes). */
  attributes: Set<string>;
}

interface SourceFiles {
  js: string;
  dts: string;
}

const cache = new Map<string, BlockSchema | null>();

/** The directory of a resource or data source in the bindings: aws_s3_bucket -> s3-bucket. */
function bindingDir(tfType: string, data: boolean): string {
  const base = tfType.replace(/^aws_/, '').replace(/_/g, '-');
  return path.join(PROVIDER_LIB, data ? `data-aws-${base}` : base);
}

/** The `{ name: { value, isBlock, type, storageClassType } }` entries of an attrs object. */
function parseAttrs(body: string): { name: string; value: string; block: boolean; kind: string; storage: string }[] {
  const re = /^\s*(\w+): \{\s*value: ([^\n]*),\s*isBlock: (true|false),\s*type: "(\w+)",\s*storageClassType: "(\w+)",\s*\},?$/gm;
  return [...body.matchAll(re)].map((m) => ({ name: m[1], value: m[2], block: m[3] === 'true', kind: m[4], storage: m[5] }));
}

/** The required properties (camelCase) of a TypeScript interface in index.d.ts. */
function requiredProps(dts: string, iface: string): Set<string> | undefined {
  const m = new RegExp(`export interface ${iface}(?: extends [\\w.]+)? \\{([\\s\\S]*?)\\n\\}`).exec(dts);
  if (!m) return undefined;
  return new Set([...m[1].matchAll(/^\s*readonly (\w+): /gm)].map((x) => x[1]));
}

function buildSchema(files: SourceFiles, attrsBody: string, iface: string, depth: number): BlockSchema {
  const required = requiredProps(files.dts, iface) ?? new Set<string>();
  const args = new Map<string, ArgSchema>();
  for (const a of parseAttrs(attrsBody)) {
    const camel = /(?:this\._|struct!?\.)(\w+)/.exec(a.value)?.[1];
    const arg: ArgSchema = {
      name: a.name,
      block: a.block,
      kind: a.kind,
      storage: a.storage,
      required: camel !== undefined && required.has(camel),
    };
    // A nested struct: its own `xxxToHclTerraform` function holds its attrs.
    const fn = /\b([a-z]\w*)ToHclTerraform\b/.exec(a.value.replace(/cdktf\.\w+ToHclTerraform/g, ''))?.[1];
    if (fn && depth < 12) {
      const body = new RegExp(`function ${fn}ToHclTerraform\\(struct\\) \\{[\\s\\S]*?const attrs = \\{([\\s\\S]*?)\\n    \\};`).exec(files.js);
      if (body) arg.nested = buildSchema(files, body[1], fn[0].toUpperCase() + fn.slice(1), depth + 1);
    }
    args.set(a.name, arg);
  }
  return { args, attributes: new Set(args.keys()) };
}

/**
 * The schema of an AWS provider resource (`aws_s3_bucket`) or data source (data=true), or null
 * when the provider has no such type.
 */
export function providerSchema(tfType: string, data = false): BlockSchema | null {
  const key = `${data ? 'data.' : ''}${tfType}`;
  if (cache.has(key)) return cache.get(key)!;
  const dir = bindingDir(tfType, data);
  let schema: BlockSchema | null = null;
  if (fs.existsSync(path.join(dir, 'index.js'))) {
    const files = { js: fs.readFileSync(path.join(dir, 'index.js'), 'utf8'), dts: fs.readFileSync(path.join(dir, 'index.d.ts'), 'utf8') };
    const cls = new RegExp(`class (\\w+) extends cdktf\\.(?:TerraformResource|TerraformDataSource) \\{([\\s\\S]*?)\\n\\}\\nexports\\.\\1 = \\1;[\\s\\S]*?\\1\\.tfResourceType = "${tfType}";`).exec(files.js);
    if (cls) {
      const hcl = /synthesizeHclAttributes\(\) \{\s*const attrs = \{([\s\S]*?)\n        \};/.exec(cls[2]);
      schema = buildSchema(files, hcl?.[1] ?? '', `${cls[1]}Config`, 0);
      // Exported attributes: every getter of the class reads one by its Terraform name.
      for (const m of cls[2].matchAll(/this\.get\w*Attribute\('(\w+)'\)/g)) schema.attributes.add(m[1]);
      for (const m of cls[2].matchAll(/new \w+(?:OutputReference|List|Map)\(this, "(\w+)"/g)) schema.attributes.add(m[1]);
    }
  }
  cache.set(key, schema);
  return schema;
}

// ---- The module ---------------------------------------------------------------------------------

export type Hcl = Record<string, any>;

/** Every .tf file of a directory, parsed, and the files' texts. */
export async function loadModule(dir: string): Promise<{ files: Record<string, Hcl>; texts: Record<string, string> }> {
  const files: Record<string, Hcl> = {};
  const texts: Record<string, string> = {};
  for (const f of fs.readdirSync(dir).filter((f) => f.endsWith('.tf')).sort()) {
    texts[f] = fs.readFileSync(path.join(dir, f), 'utf8');
    files[f] = await parse(f, texts[f]);
  }
  return { files, texts };
}

/** The blocks of one kind (resource, data, variable, output, module, locals) over every file. */
export function blocks(files: Record<string, Hcl>, kind: 'resource' | 'data'): { type: string; name: string; body: Hcl }[];
export function blocks(files: Record<string, Hcl>, kind: 'variable' | 'output' | 'module'): { name: string; body: Hcl }[];
export function blocks(files: Record<string, Hcl>, kind: string): any[] {
  const out: any[] = [];
  for (const hcl of Object.values(files)) {
    const section = hcl[kind];
    if (!section) continue;
    if (kind === 'resource' || kind === 'data') {
      for (const [type, byName] of Object.entries<any>(section)) {
        for (const [name, list] of Object.entries<any>(byName)) for (const body of list) out.push({ type, name, body });
      }
    } else {
      for (const [name, list] of Object.entries<any>(section)) for (const body of list) out.push({ name, body });
    }
  }
  return out;
}

/** Every local value's name and expression. */
export function locals(files: Record<string, Hcl>): Map<string, unknown> {
  const m = new Map<string, unknown>();
  for (const hcl of Object.values(files)) for (const l of hcl.locals ?? []) for (const [k, v] of Object.entries(l)) m.set(k, v);
  return m;
}

// ---- Checking a block against a schema ------------------------------------------------------------

const META_ARGS = new Set(['count', 'for_each', 'depends_on', 'provider', 'lifecycle']);
const RESOURCE_ONLY_META = new Set(['provisioner', 'connection']);

const isExpr = (v: unknown): boolean => typeof v === 'string' && /^\$\{[\s\S]*\}$/.test(v) && !/\}[\s\S]*\$\{/.test(v.slice(2, -1).replace(/\$\{[^}]*\}/g, ''));
const isTemplate = (v: unknown): boolean => typeof v === 'string' && v.includes('${');

/** Type errors a literal value shows against an argument's schema (expressions are not typed here). */
function typeProblem(arg: ArgSchema, v: unknown): string | undefined {
  if (isExpr(v)) return undefined;
  const s = arg.storage;
  const scalar = typeof v === 'string' || typeof v === 'number' || typeof v === 'boolean';
  if (s === 'string') return scalar ? undefined : 'expects a string';
  if (s === 'number') {
    if (typeof v === 'number') return undefined;
    if (typeof v === 'string' && (isTemplate(v) || /^-?\d+(\.\d+)?$/.test(v))) return undefined;
    return 'expects a number';
  }
  if (s === 'boolean') {
    if (typeof v === 'boolean' || v === 'true' || v === 'false' || isTemplate(v)) return undefined;
    return 'expects true or false';
  }
  if (/List$/.test(s) || arg.kind === 'list' || arg.kind === 'set') return Array.isArray(v) ? undefined : 'expects a list';
  if (/Map$/.test(s) || arg.kind === 'map') return typeof v === 'object' && v !== null && !Array.isArray(v) ? undefined : 'expects a map';
  return undefined;
}

/**
 * Problems of one block body against a schema: unknown arguments, missing required ones, a block
 * written as an argument or the other way round, literal values of the wrong type; nested blocks
 * and `dynamic` blocks' content are checked recursively.
 */
export function checkBody(where: string, body: Hcl, schema: BlockSchema, topLevel: 'resource' | 'data' | false): string[] {
  const problems: string[] = [];
  const present = new Set<string>();
  for (const [key, value] of Object.entries(body)) {
    if (topLevel && (META_ARGS.has(key) || (topLevel === 'resource' && RESOURCE_ONLY_META.has(key)))) continue;
    if (key === 'dynamic') {
      for (const [name, list] of Object.entries<any>(value)) {
        const arg = schema.args.get(name);
        if (!arg || !arg.block) {
          problems.push(`${where}: dynamic "${name}" is not a block of this type`);
          continue;
        }
        present.add(name);
        for (const d of list) {
          for (const k of Object.keys(d)) {
            if (!['for_each', 'iterator', 'labels', 'content'].includes(k)) problems.push(`${where}: dynamic "${name}" has an unknown argument ${k}`);
          }
          if (d.for_each === undefined) problems.push(`${where}: dynamic "${name}" needs for_each`);
          for (const c of d.content ?? []) if (arg.nested) problems.push(...checkBody(`${where}.${name}`, c, arg.nested, false));
        }
      }
      continue;
    }
    const arg = schema.args.get(key);
    if (!arg) {
      problems.push(`${where}: unknown argument or block "${key}"`);
      continue;
    }
    present.add(key);
    const asBlocks = Array.isArray(value) && value.length > 0 && value.every((x) => typeof x === 'object' && x !== null && !Array.isArray(x));
    if (arg.block) {
      if (!asBlocks) {
        problems.push(`${where}: "${key}" is a block, write ${key} { ... }`);
        continue;
      }
      if (arg.kind === 'struct' && value.length > 1) problems.push(`${where}: at most one "${key}" block`);
      for (const b of value) if (arg.nested) problems.push(...checkBody(`${where}.${key}`, b, arg.nested, false));
      continue;
    }
    if (asBlocks && arg.nested === undefined) {
      problems.push(`${where}: "${key}" is an argument, write ${key} = ...`);
      continue;
    }
    const t = typeProblem(arg, value);
    if (t) problems.push(`${where}: "${key}" ${t}, got ${JSON.stringify(value).slice(0, 60)}`);
  }
  for (const arg of schema.args.values()) {
    if (arg.required && !present.has(arg.name)) problems.push(`${where}: missing required ${arg.block ? 'block' : 'argument'} "${arg.name}"`);
  }
  return problems;
}

/** Schema problems of every resource and data source of a parsed module. */
export function checkSchema(files: Record<string, Hcl>): string[] {
  const problems: string[] = [];
  for (const kind of ['resource', 'data'] as const) {
    for (const b of blocks(files, kind)) {
      const where = `${kind === 'data' ? 'data.' : ''}${b.type}.${b.name}`;
      const schema = providerSchema(b.type, kind === 'data');
      if (!schema) {
        problems.push(`${where}: the AWS provider has no ${kind === 'data' ? 'data source' : 'resource type'} ${b.type}`);
        continue;
      }
      problems.push(...checkBody(where, b.body, schema, kind));
    }
  }
  return problems;
}

// ---- References -------------------------------------------------------------------------------------

/** Terraform's built-in functions (language version 1.9). */
export const FUNCTIONS = new Set(
  ('abs abspath alltrue anytrue base64decode base64encode base64gzip base64sha256 base64sha512 basename bcrypt can ceil chomp chunklist ' +
    'cidrhost cidrnetmask cidrsubnet cidrsubnets coalesce coalescelist compact concat contains csvdecode dirname distinct element endswith ' +
    'ephemeralasnull file filebase64 filebase64sha256 filebase64sha512 fileexists filemd5 fileset filesha1 filesha256 filesha512 flatten ' +
    'floor format formatdate formatlist indent index issensitive join jsondecode jsonencode keys length list log lookup lower map matchkeys ' +
    'max md5 merge min nonsensitive one parseint pathexpand plantimestamp pow range regex regexall replace reverse rsadecrypt sensitive ' +
    'setintersection setproduct setsubtract setunion sha1 sha256 sha512 signum slice sort split startswith strcontains strrev substr sum ' +
    'templatefile templatestring textdecodebase64 textencodebase64 timeadd timecmp timestamp title tobool tolist tomap tonumber toset ' +
    'tostring transpose trim trimprefix trimspace trimsuffix try upper urlencode uuid uuidv5 values yamldecode yamlencode zipmap ' +
    // Type constraints in variable declarations.
    'object optional tuple set string number bool any').split(/\s+/),
);

export interface ModuleIndex {
  variables: Set<string>;
  locals: Set<string>;
  resources: Map<string, { type: string; name: string; body: Hcl }>;
  data: Map<string, { type: string; name: string; body: Hcl }>;
  modules: Set<string>;
}

export function indexModule(files: Record<string, Hcl>): ModuleIndex {
  return {
    variables: new Set(blocks(files, 'variable').map((b) => b.name)),
    locals: new Set(locals(files).keys()),
    resources: new Map(blocks(files, 'resource').map((b) => [`${b.type}.${b.name}`, b])),
    data: new Map(blocks(files, 'data').map((b) => [`${b.type}.${b.name}`, b])),
    modules: new Set(blocks(files, 'module').map((b) => b.name)),
  };
}

interface Ctx {
  where: string;
  /** Symbols bound here: each, count, self, a dynamic block's iterator, for-expression variables. */
  bound: Set<string>;
}

type Segment = { type: string; segment?: string };

function checkTraversal(ix: ModuleIndex, ctx: Ctx, segs: Segment[], full: string, used: Set<string>): string | undefined {
  const root = segs[0]?.segment ?? '';
  const name = (i: number) => (segs[i]?.type === 'nameTraversal' ? segs[i].segment : undefined);
  const attrOf = (schema: BlockSchema | null, i: number): string | undefined => {
    // An instance key ([0], ["x"], [*]) may come before the attribute.
    let j = i;
    while (segs[j] && segs[j].type !== 'nameTraversal') j++;
    const attr = name(j);
    if (attr && schema && !schema.attributes.has(attr)) return `${full}: ${attr} is not an attribute of this type`;
    return undefined;
  };
  switch (root) {
    case 'var':
      used.add(name(1) ?? '');
      return ix.variables.has(name(1) ?? '') ? undefined : `${full}: undeclared variable`;
    case 'local':
      return ix.locals.has(name(1) ?? '') ? undefined : `${full}: undeclared local value`;
    case 'module':
      return ix.modules.has(name(1) ?? '') ? undefined : `${full}: undeclared module`;
    case 'data': {
      const r = ix.data.get(`${name(1)}.${name(2)}`);
      if (!r) return `${full}: undeclared data source`;
      return attrOf(providerSchema(r.type, true), 3);
    }
    case 'path':
      return ['module', 'root', 'cwd'].includes(name(1) ?? '') ? undefined : `${full}: unknown path attribute`;
    case 'terraform':
      return ['workspace'].includes(name(1) ?? '') ? undefined : `${full}: unknown terraform attribute`;
    default:
      if (ctx.bound.has(root)) return undefined;
      if (/^aws_/.test(root)) {
        const r = ix.resources.get(`${root}.${name(1)}`);
        if (!r) return `${full}: undeclared resource`;
        const repeated = r.body.count !== undefined || r.body.for_each !== undefined;
        const indexed = segs[2] !== undefined && segs[2].type !== 'nameTraversal';
        if (repeated && segs.length > 2 && !indexed) return `${full}: ${root}.${name(1)} has count or for_each; index it`;
        if (!repeated && indexed) return `${full}: ${root}.${name(1)} has no count or for_each`;
        return attrOf(providerSchema(r.type), 2);
      }
      return `${full}: unknown symbol ${root}`;
  }
}

async function checkExpression(ix: ModuleIndex, ctx: Ctx, expr: string, used: Set<string>): Promise<string[]> {
  const problems: string[] = [];
  // hcl2json gives an expression as its source text in ${...}: a quoted template holds it as it is.
  const quoted = `"${expr}"`;
  let ast: any;
  try {
    ast = await getExpressionAst('main.tf', quoted);
  } catch (e) {
    return [`${ctx.where}: cannot parse ${expr.slice(0, 80)}: ${(e as Error).message.slice(0, 200)}`];
  }
  const walk = (node: any, bound: Set<string>): void => {
    if (!node) return;
    let inner = bound;
    if (node.type === 'for') {
      inner = new Set(bound);
      if (node.meta?.keyVar) inner.add(node.meta.keyVar);
      if (node.meta?.valVar) inner.add(node.meta.valVar);
      if (node.meta?.valueVar) inner.add(node.meta.valueVar);
    }
    if (node.type === 'scopeTraversal') {
      const p = checkTraversal(ix, { ...ctx, bound }, node.meta.traversal, node.meta.fullAccessor, used);
      if (p) problems.push(`${ctx.where}: ${p}`);
    }
    if (node.type === 'function' && !FUNCTIONS.has(node.meta?.name)) problems.push(`${ctx.where}: unknown function ${node.meta?.name}()`);
    for (const c of node.children ?? []) walk(c, inner);
  };
  walk(ast, ctx.bound);
  return problems;
}

/** Every string of a parsed body holding an expression, with the symbols bound where it is. */
function* expressions(value: unknown, ctx: Ctx): Generator<{ expr: string; ctx: Ctx }> {
  if (typeof value === 'string') {
    if (value.includes('${')) yield { expr: value, ctx };
    return;
  }
  if (Array.isArray(value)) {
    for (const v of value) yield* expressions(v, ctx);
    return;
  }
  if (value && typeof value === 'object') {
    for (const [k, v] of Object.entries(value)) {
      if (k === 'dynamic') {
        for (const [name, list] of Object.entries<any>(v)) {
          for (const d of list) {
            const iterator = typeof d.iterator === 'string' ? d.iterator : name;
            yield* expressions(d.for_each, { ...ctx, where: `${ctx.where}.dynamic.${name}` });
            yield* expressions(d.content, { where: `${ctx.where}.${name}`, bound: new Set([...ctx.bound, iterator]) });
          }
        }
        continue;
      }
      yield* expressions(v, { ...ctx, where: `${ctx.where}.${k}` });
    }
  }
}

/**
 * Unresolved references of a parsed module, plus variables declared and never used; the
 * examples' `module` blocks are checked against the module's variables.
 */
export async function checkReferences(files: Record<string, Hcl>): Promise<string[]> {
  const ix = indexModule(files);
  const used = new Set<string>();
  const problems: string[] = [];
  const todo: { expr: string; ctx: Ctx; validation?: boolean }[] = [];
  for (const kind of ['resource', 'data'] as const) {
    for (const b of blocks(files, kind)) {
      const bound = new Set<string>();
      if (b.body.count !== undefined) bound.add('count');
      if (b.body.for_each !== undefined) bound.add('each');
      if (kind === 'resource') bound.add('self');
      // lifecycle.ignore_changes names the resource's own arguments.
      const { lifecycle, ...rest } = b.body;
      for (const l of lifecycle ?? []) {
        for (const attr of l.ignore_changes ?? []) {
          const name = String(attr).replace(/^\$\{(.*)\}$/, '$1');
          if (!providerSchema(b.type, kind === 'data')?.args.has(name)) problems.push(`${b.type}.${b.name}: ignore_changes names no argument ${name}`);
        }
      }
      todo.push(...expressions(rest, { where: `${kind === 'data' ? 'data.' : ''}${b.type}.${b.name}`, bound }));
    }
  }
  for (const [name, v] of locals(files)) todo.push(...expressions(v, { where: `local.${name}`, bound: new Set() }));
  for (const b of blocks(files, 'output')) todo.push(...expressions(b.body, { where: `output.${b.name}`, bound: new Set() }));
  for (const b of blocks(files, 'module')) todo.push(...expressions(b.body, { where: `module.${b.name}`, bound: new Set() }));
  for (const b of blocks(files, 'variable')) {
    // A validation may refer to its own variable (and, from Terraform 1.9, to others).
    for (const e of expressions(b.body.validation ?? [], { where: `var.${b.name}.validation`, bound: new Set() })) {
      todo.push({ ...e, validation: true });
    }
  }
  for (const { expr, ctx, validation } of todo) {
    // A variable that only validations read is still unused.
    problems.push(...(await checkExpression(ix, ctx, expr, validation ? new Set() : used)));
  }
  for (const v of ix.variables) if (!used.has(v)) problems.push(`var.${v}: declared but never used`);
  return problems;
}
