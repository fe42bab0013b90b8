// The capture image asset: synth stages the repository root as the Docker build context (it never
// builds the image), and that context holds the Rust workspace only.

import assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { before, describe, it } from 'node:test';
import { REPO_ROOT } from '../lib/config';
import { minimalConfig, synth, Synthesized } from './helpers';

function walk(dir: string, rel = ''): string[] {
  const out: string[] = [];
  for (const e of fs.readdirSync(path.join(dir, rel), { withFileTypes: true })) {
    const p = path.join(rel, e.name);
    out.push(e.isDirectory() ? `${p}/` : p);
    if (e.isDirectory()) out.push(...walk(dir, p));
  }
  return out;
}

describe('capture image asset', () => {
  let s: Synthesized;
  let context: string;
  let files: string[];
  let asset: any;
  let ms: number;
  before(() => {
    const t = Date.now();
    s = synth('asset', minimalConfig());
    ms = Date.now() - t;
    const manifest = JSON.parse(fs.readFileSync(path.join(s.outdir, `${s.stack.stackName}.assets.json`), 'utf8'));
    const images = Object.values<any>(manifest.dockerImages ?? {});
    assert.equal(images.length, 1, 'one image for every capture service');
    asset = images[0];
    context = path.join(s.outdir, asset.source.directory);
    files = walk(context);
  });

  it('is built from capture/Dockerfile for linux/arm64', () => {
    assert.equal(asset.source.dockerFile, 'capture/Dockerfile');
    assert.equal(asset.source.platform, 'linux/arm64');
  });

  it('stages the Rust workspace', () => {
    for (const f of ['Cargo.toml', 'Cargo.lock', 'capture/Dockerfile', 'cdc-contract/metrics.json', '.dockerignore']) {
      assert.ok(files.includes(f), `${f} staged`);
    }
  });

  it('stages and copies every workspace member (cargo reads every manifest to build one package)', () => {
    const cargo = fs.readFileSync(path.join(REPO_ROOT, 'Cargo.toml'), 'utf8');
    const list = /^members\s*=\s*\[([^\]]*)\]/m.exec(cargo);
    assert.ok(list, 'workspace members');
    const members = [...list[1].matchAll(/"([^"]+)"/g)].map((m) => m[1]);
    assert.ok(members.length >= 4, members.join(','));
    const dockerfile = fs.readFileSync(path.join(REPO_ROOT, 'capture', 'Dockerfile'), 'utf8');
    const ignore = fs.readFileSync(path.join(REPO_ROOT, '.dockerignore'), 'utf8').split('\n').map((l) => l.trim());
    for (const m of members) {
      assert.ok(files.includes(`${m}/Cargo.toml`), `${m}/Cargo.toml staged`);
      assert.match(dockerfile, new RegExp(`^COPY ${m} ${m}$`, 'm'), `Dockerfile copies ${m}`);
      assert.ok(ignore.includes(`!${m}`), `.dockerignore lets ${m} in`);
    }
  });

  it('stages no build output, virtualenv, node_modules, CDK output, git or local state', () => {
    const banned = /(^|\/)(target|\.venv|node_modules|cdk\.out|\.git|\.local)\/|^infra\//;
    const found = files.filter((f) => banned.test(f));
    assert.deepEqual(found, []);
    assert.ok(files.length < 1000, `${files.length} files staged`);
    assert.ok(ms < 60_000, `synth with staging took ${ms} ms`);
  });

  it('.dockerignore keeps the same things out of a plain docker build', () => {
    const lines = fs.readFileSync(path.join(REPO_ROOT, '.dockerignore'), 'utf8').split('\n').map((l) => l.trim());
    for (const p of ['target', '.venv', 'infra/node_modules', 'infra/cdk.out', '.git']) assert.ok(lines.includes(p), p);
  });

  it('the Dockerfile cross-compiles for ARM64 and runs as non-root on distroless', () => {
    const d = fs.readFileSync(path.join(REPO_ROOT, 'capture', 'Dockerfile'), 'utf8');
    assert.match(d, /^FROM --platform=\$BUILDPLATFORM rust:1-bookworm AS build$/m);
    assert.match(d, /cargo-zigbuild/);
    assert.match(d, /aarch64-unknown-linux-gnu/);
    assert.match(d, /rustup target add/);
    assert.match(d, /cargo zigbuild --release --locked -p capture --target/);
    assert.match(d, /^FROM --platform=\$TARGETPLATFORM gcr\.io\/distroless\/cc-debian12:nonroot$/m);
    assert.match(d, /^COPY --from=build \/out\/capture \/usr\/local\/bin\/capture$/m);
    assert.match(d, /^USER nonroot:nonroot$/m);
    assert.match(d, /^ENTRYPOINT \["\/usr\/local\/bin\/capture"\]$/m);
  });
});
