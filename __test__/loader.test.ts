/**
 * The loader and the CLI as an installed package sees them: dist/ copied into a project's node_modules, with
 * and without the platform package, in child processes. Needs `npm run build` first.
 */
import test, { type ExecutionContext } from 'ava';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { nodeFileTrace } from '@vercel/nft';
import { ROOT } from './fixtures.js';
import { tempDir } from './helpers.js';

const TRIPLE = `linux-${process.arch}-gnu`;
const PKG = `@loopdev/loop-${TRIPLE}`;
const VERSION = (JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { version: string }).version;

/** A project with @loopdev/loop installed from dist/, and the platform package only when `native`. */
function project(t: ExecutionContext, native: boolean): string {
  t.true(fs.existsSync(path.join(ROOT, 'dist/load.js')), 'run `npm run build` first');
  const dir = tempDir(t);
  const main = path.join(dir, 'node_modules/@loopdev/loop');
  fs.mkdirSync(main, { recursive: true });
  fs.cpSync(path.join(ROOT, 'dist'), path.join(main, 'dist'), { recursive: true });
  fs.copyFileSync(path.join(ROOT, 'package.json'), path.join(main, 'package.json'));
  if (native) {
    const pkg = path.join(dir, 'node_modules', PKG);
    fs.mkdirSync(pkg, { recursive: true });
    fs.copyFileSync(path.join(ROOT, 'npm', TRIPLE, 'package.json'), path.join(pkg, 'package.json'));
    fs.copyFileSync(path.join(ROOT, `loopdev.${TRIPLE}.node`), path.join(pkg, `loopdev.${TRIPLE}.node`));
  }
  return dir;
}

/** Imports the package in a child and prints what happened as JSON. */
const PROBE = `
try {
  const m = await import('@loopdev/loop');
  console.log(JSON.stringify({ ok: typeof m.listSync === 'function' && Array.isArray(m.listSync()) }));
} catch (e) {
  console.log(JSON.stringify({ code: e.code, message: e.message, platform: e.platform, package: e.package }));
}`;

function probe(dir: string, nodeArgs: string[] = []): Record<string, unknown> {
  fs.writeFileSync(path.join(dir, 'probe.mjs'), PROBE);
  const r = spawnSync(process.execPath, [...nodeArgs, 'probe.mjs'], { cwd: dir, encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`probe exited ${r.status}: ${r.stderr}`);
  return JSON.parse(r.stdout) as Record<string, unknown>;
}

function cli(dir: string, args: string[]) {
  const r = spawnSync(process.execPath, [path.join(dir, 'node_modules/@loopdev/loop/dist/cli.js'), ...args], {
    cwd: dir,
    encoding: 'utf8',
  });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

test('with the platform package installed, the package loads its binary', (t) => {
  t.deepEqual(probe(project(t, true)), { ok: true });
});

test('without the platform package: ERR_LOOP_NATIVE_MISSING naming the package and the usual causes', (t) => {
  const r = probe(project(t, false));
  t.is(r.code, 'ERR_LOOP_NATIVE_MISSING');
  t.is(r.platform, TRIPLE);
  t.is(r.package, PKG);
  t.regex(String(r.message), new RegExp(`install ${PKG.replace('/', '\\/')} `));
  t.regex(String(r.message), /--omit=optional/);
  t.regex(String(r.message), /lockfile was made on another/);
  t.notRegex(String(r.message), /\n/, 'one line');
});

test('on a platform we do not build: ERR_LOOP_UNSUPPORTED_PLATFORM naming it and the supported list', (t) => {
  const dir = project(t, true);
  fs.writeFileSync(path.join(dir, 'riscv.mjs'), "Object.defineProperty(process, 'arch', { value: 'riscv64' });");
  const r = probe(dir, ['--import=./riscv.mjs']);
  t.is(r.code, 'ERR_LOOP_UNSUPPORTED_PLATFORM');
  t.is(r.platform, 'linux-riscv64-gnu');
  t.regex(String(r.message), /linux-x64-gnu, linux-arm64-gnu/);
});

test('a file tracer finds the platform binary through the loader', async (t) => {
  const dir = project(t, true);
  fs.writeFileSync(path.join(dir, 'app.mjs'), "import { list } from '@loopdev/loop';\nawait list();\n");
  const { fileList } = await nodeFileTrace([path.join(dir, 'app.mjs')], { base: dir });
  t.true(fileList.has(`node_modules/${PKG}/loopdev.${TRIPLE}.node`), [...fileList].join('\n'));
});

test('without the binary the CLI still answers --help, --version, usage errors and list', (t) => {
  const dir = project(t, false);
  const help = cli(dir, ['--help']);
  t.is(help.code, 0, help.stderr);
  t.regex(help.stdout, /^Usage: loopdev COMMAND/m);
  const attachHelp = cli(dir, ['attach', '--help']);
  t.is(attachHelp.code, 0, attachHelp.stderr);
  t.regex(attachHelp.stdout, /^Usage: loopdev attach FILE/);
  const version = cli(dir, ['--version']);
  t.deepEqual(version, { code: 0, stdout: `${VERSION}\n`, stderr: '' });
  const list = cli(dir, ['list', '--json']);
  t.is(list.code, 0, list.stderr);
  t.true(Array.isArray((JSON.parse(list.stdout) as { loopdevices: unknown }).loopdevices));
  for (const [args, pattern] of [
    [['attach'], /^loopdev attach: missing FILE \(see "loopdev attach --help"\)\n$/],
    // Not a command name: losetup's `losetup DEV`, which needs no binary either.
    [['frobnicate'], /^loopdev: frobnicate: failed to use device: ENOENT/],
    [['attach', '--offset', 'x', 'disk.img'], /^loopdev: invalid --offset 'x': expected bytes/],
  ] as const) {
    const r = cli(dir, [...args]);
    t.is(r.code, 1, args.join(' '));
    t.is(r.stdout, '');
    t.regex(r.stderr, pattern);
    t.is(r.stderr.split('\n').filter(Boolean).length, 1, r.stderr);
  }
});

test('without the binary, commands that need it fail with the loader error on one line, exit 1', (t) => {
  const dir = project(t, false);
  fs.writeFileSync(path.join(dir, 'disk.img'), Buffer.alloc(1 << 20));
  // The device name cannot exist, so nothing real is ever detached even if the binary were found.
  for (const args of [['attach', path.join(dir, 'disk.img')], ['detach', '/dev/loop999999']]) {
    const r = cli(dir, args);
    t.is(r.code, 1, args.join(' '));
    t.is(r.stdout, '');
    t.regex(r.stderr, new RegExp(`^loopdev: @loopdev/loop: the native binary for ${TRIPLE} is missing: install `));
    t.is(r.stderr.split('\n').filter(Boolean).length, 1, r.stderr);
    t.notRegex(r.stderr, /^\s+at /m, 'no stack trace');
  }
});
