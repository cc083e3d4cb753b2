#!/usr/bin/env node
// Publishes @loopdev/loop and one package per target from this checkout, with nothing patched by hand:
// builds every target's addon from source, stages npm/<platform> packages and the main package (compiled
// TypeScript, optionalDependencies pinned to this exact version) in a staging dir, then publishes the
// platform packages first so the main package never points at versions that are not there yet.
// Usage: npm run release -- --registry URL [--dry-run] [--stage DIR]
// The checkout itself is not modified (no dist/, no .node at the root, package.json untouched); only
// Cargo's build cache (target/ or CARGO_TARGET_DIR) is written.
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { parseArgs } from 'node:util';

const root = path.resolve(path.dirname(new URL(import.meta.url).pathname), '..');

const { values: args } = parseArgs({
  options: {
    registry: { type: 'string' },
    'dry-run': { type: 'boolean', default: false },
    stage: { type: 'string' },
  },
});
// No default registry: a slip would otherwise publish to whatever the user's npmrc points at.
if (!args.registry && !args['dry-run']) fail('--registry URL is required (or --dry-run)');

const main = readJson(path.join(root, 'package.json'));
const stage = path.resolve(args.stage ?? fs.mkdtempSync(path.join(os.tmpdir(), 'loopdev-release-')));
fs.mkdirSync(stage, { recursive: true });
// Never cleared by us: a mistyped --stage must not cost anyone a directory.
if (fs.readdirSync(stage).length) fail(`--stage ${stage} is not empty`);

// How each Rust target is built on this (x86_64 Debian) host, and the ELF e_machine its addon must have.
const TARGETS = {
  'x86_64-unknown-linux-gnu': {
    platform: 'linux-x64-gnu',
    machine: 62,
    build: (out) => {
      const tmp = fs.mkdtempSync(path.join(stage, 'napi-'));
      run(path.join(root, 'node_modules/.bin/napi'), [
        'build', '--platform', '--release', '--manifest-path', 'crates/loopdev-napi/Cargo.toml', '--output-dir', tmp,
      ]);
      fs.renameSync(path.join(tmp, 'loopdev.linux-x64-gnu.node'), out);
      fs.rmSync(tmp, { recursive: true });
    },
  },
  'aarch64-unknown-linux-gnu': {
    platform: 'linux-arm64-gnu',
    machine: 183,
    build: (out) => run('bash', ['scripts/build-arm64.sh', out]),
  },
};
if (process.arch !== 'x64') fail(`release builds run on x86_64 hosts (this is ${process.arch})`);

const packages = [];
for (const triple of main.napi.targets) {
  const target = TARGETS[triple];
  if (!target) fail(`no build recipe for napi target ${triple}`);
  const src = path.join(root, 'npm', target.platform);
  const dir = path.join(stage, target.platform);
  fs.mkdirSync(dir);
  const pkg = readJson(path.join(src, 'package.json'));
  if (pkg.name !== `${main.name}-${target.platform}`) fail(`${src}/package.json is named ${pkg.name}`);
  const binary = path.join(dir, pkg.main);
  log(`building ${triple}`);
  target.build(binary);
  checkElf(binary, target.machine);
  writeJson(path.join(dir, 'package.json'), { ...pkg, version: main.version });
  fs.copyFileSync(path.join(src, 'README.md'), path.join(dir, 'README.md'));
  fs.copyFileSync(path.join(root, 'LICENSE'), path.join(dir, 'LICENSE'));
  packages.push({ name: pkg.name, dir });
}

log('compiling TypeScript');
const mainDir = path.join(stage, 'main');
run(path.join(root, 'node_modules/.bin/tsc'), ['-p', 'tsconfig.build.json', '--outDir', path.join(mainDir, 'dist')]);
for (const f of ['README.md', 'LICENSE']) fs.copyFileSync(path.join(root, f), path.join(mainDir, f));
// What users get: the platform packages at exactly this version; the development-only fields left out
// (scripts would run prepack again, against sources that are not in the stage).
const { scripts, devDependencies, overrides, ava, ...published } = main;
writeJson(path.join(mainDir, 'package.json'), {
  ...published,
  optionalDependencies: Object.fromEntries(packages.map((p) => [p.name, main.version])),
});
packages.push({ name: main.name, dir: mainDir });

for (const p of packages) {
  log(`${args['dry-run'] ? 'dry run: ' : ''}publishing ${p.name}@${main.version}`);
  run('npm', [
    'publish', p.dir, '--loglevel=warn', ...(args.registry ? ['--registry', args.registry] : []),
    ...(args['dry-run'] ? ['--dry-run'] : []),
  ]);
}
log(`${args['dry-run'] ? 'dry run done' : 'published'}: ${packages.map((p) => p.name).join(', ')} (staged in ${stage})`);

function run(cmd, argv) {
  execFileSync(cmd, argv, { cwd: root, stdio: ['ignore', 2, 2] });
}

function checkElf(file, machine) {
  const head = Buffer.alloc(20);
  const fd = fs.openSync(file, 'r');
  fs.readSync(fd, head, 0, 20, 0);
  fs.closeSync(fd);
  const ok = head.readUInt32BE(0) === 0x7f454c46 && head[4] === 2 && head.readUInt16LE(16) === 3;
  if (!ok || head.readUInt16LE(18) !== machine) fail(`${file} is not a 64-bit ELF shared object for machine ${machine}`);
}

function readJson(file) {
  return JSON.parse(fs.readFileSync(file, 'utf8'));
}

function writeJson(file, value) {
  fs.writeFileSync(file, `${JSON.stringify(value, null, 2)}\n`);
}

function log(msg) {
  process.stderr.write(`release: ${msg}\n`);
}

function fail(msg) {
  log(msg);
  process.exit(1);
}
