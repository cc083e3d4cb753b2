/**
 * The package as a user gets it from a registry: a real verdaccio on 127.0.0.1, `npm run release` into it,
 * then empty projects that install @loopdev/loop with npm, bun and deno and use it. Nothing is patched by
 * hand: what is tested is what the release command published.
 */
import test, { type ExecutionContext } from 'ava';
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { ROOT } from './fixtures.js';
import { boundAfterSettling, image, loopTest } from './helpers.js';

const TRIPLE = `linux-${process.arch}-gnu`;
const PKG = `@loopdev/loop-${TRIPLE}`;
const MAIN = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as {
  version: string;
  napi: { targets: string[] };
};
const FIXTURES = path.join(ROOT, '__test__/fixtures/installed');
const bin = (name: string) => path.join(ROOT, 'node_modules/.bin', name);

let work: string;
let registry: string;
let env: NodeJS.ProcessEnv;
let proj: string;
let verdaccio: ChildProcess | undefined;

/** Runs a command; on failure the error names it and carries its output. */
function run(cmd: string, args: string[], cwd: string, extra: NodeJS.ProcessEnv = {}): string {
  const r = spawnSync(cmd, args, { cwd, env: { ...env, ...extra }, encoding: 'utf8', timeout: 240_000 });
  if (r.status !== 0) {
    throw new Error(`${path.basename(cmd)} ${args.join(' ')} exited ${r.status ?? r.signal}:\n${r.stdout}\n${r.stderr}`);
  }
  return r.stdout;
}

async function freePort(): Promise<number> {
  const srv = net.createServer();
  await new Promise<void>((resolve) => srv.listen(0, '127.0.0.1', resolve));
  const { port } = srv.address() as net.AddressInfo;
  await new Promise((resolve) => srv.close(resolve));
  return port;
}

async function startVerdaccio(): Promise<string> {
  const dir = path.join(work, 'verdaccio');
  fs.mkdirSync(dir);
  // No uplinks: a name we did not publish must not be fetched from anywhere else.
  fs.writeFileSync(
    path.join(dir, 'config.yaml'),
    `storage: ${dir}/storage\nuplinks: {}\npackages:\n  '**':\n    access: $all\n    publish: $all\n` +
      'log: { type: stdout, format: pretty, level: warn }\n',
  );
  const port = await freePort();
  const url = `http://127.0.0.1:${port}/`;
  let output = '';
  verdaccio = spawn(bin('verdaccio'), ['--config', path.join(dir, 'config.yaml'), '--listen', `127.0.0.1:${port}`], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  verdaccio.stdout!.on('data', (d: Buffer) => (output += d));
  verdaccio.stderr!.on('data', (d: Buffer) => (output += d));
  for (const t0 = Date.now(); Date.now() - t0 < 30_000; ) {
    if (verdaccio.exitCode !== null) throw new Error(`verdaccio exited ${verdaccio.exitCode}: ${output}`);
    const up = await fetch(`${url}-/ping`).then((r) => r.ok, () => false);
    if (up) return url;
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
  throw new Error(`verdaccio did not answer on ${url} within 30 s: ${output}`);
}

/** An empty project (no "type": what `npm init -y` gives) that talks only to our registry. */
function emptyProject(name: string): string {
  const dir = fs.mkdtempSync(path.join(work, `${name}-`));
  fs.writeFileSync(path.join(dir, 'package.json'), JSON.stringify({ name, version: '1.0.0', private: true }));
  for (const f of fs.readdirSync(FIXTURES)) fs.copyFileSync(path.join(FIXTURES, f), path.join(dir, f));
  return dir;
}

test.before(async () => {
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'loopdev-registry-'));
  registry = await startVerdaccio();
  fs.writeFileSync(path.join(work, 'npmrc'), `//${new URL(registry).host}/:_authToken=anything\n`);
  // Only our registry, our token and an empty cache: nothing from the developer's npm setup leaks in.
  env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !/^npm_config_/i.test(k)));
  Object.assign(env, {
    npm_config_registry: registry,
    npm_config_userconfig: path.join(work, 'npmrc'),
    npm_config_cache: path.join(work, 'npm-cache'),
    npm_config_audit: 'false',
    npm_config_fund: 'false',
    npm_config_update_notifier: 'false',
    NO_COLOR: '1',
  });
  run('npm', ['run', '--silent', 'release', '--', '--registry', registry, '--stage', path.join(work, 'stage')], ROOT);
  proj = emptyProject('proj');
  run('npm', ['install', '@loopdev/loop'], proj);
});

test.after.always(async () => {
  if (verdaccio && verdaccio.exitCode === null) {
    const exited = new Promise((resolve) => verdaccio!.once('exit', resolve));
    verdaccio.kill('SIGTERM');
    await exited;
  }
  if (work) fs.rmSync(work, { recursive: true, force: true });
});

test('npm install brings the main package and exactly the platform package of this machine', (t) => {
  t.deepEqual(fs.readdirSync(path.join(proj, 'node_modules/@loopdev')).sort(), ['loop', `loop-${TRIPLE}`]);
  const installed = JSON.parse(fs.readFileSync(path.join(proj, 'node_modules/@loopdev/loop/package.json'), 'utf8'));
  const platforms = MAIN.napi.targets.map((tr) => `@loopdev/loop-linux-${tr.startsWith('x86_64') ? 'x64' : 'arm64'}-gnu`);
  t.deepEqual(installed.optionalDependencies, Object.fromEntries(platforms.map((p) => [p, MAIN.version])));
  const files = ['LICENSE', 'README.md', 'dist/index.js', 'dist/index.d.ts', 'dist/cli.js'];
  t.deepEqual(files.filter((f) => !fs.existsSync(path.join(proj, 'node_modules/@loopdev/loop', f))), []);
  t.true(fs.existsSync(path.join(proj, 'node_modules', PKG, `loopdev.${TRIPLE}.node`)));
  t.true(fs.existsSync(path.join(proj, 'node_modules', PKG, 'LICENSE')));
});

loopTest('npx loopdev attaches, lists (--json) and detaches', async (t) => {
  const img = image(t);
  const dev = run('npx', ['--no-install', 'loopdev', 'attach', '--read-only', img.path], proj).trim();
  t.regex(dev, /^\/dev\/loop\d+$/);
  try {
    const listed = JSON.parse(run('npx', ['--no-install', 'loopdev', 'list', '--json'], proj)) as {
      loopdevices: { name: string; 'back-file': string; ro: boolean }[];
    };
    t.like(listed.loopdevices.find((d) => d.name === dev), { 'back-file': img.path, ro: true });
  } finally {
    run('npx', ['--no-install', 'loopdev', 'detach', dev], proj);
  }
  t.deepEqual(await boundAfterSettling(img.path), []);
});

loopTest('node: import works (attach, list, asyncDispose) with no Rust toolchain on PATH', async (t) => {
  const img = image(t);
  // A PATH with node and nothing else: no cargo, rustc or cc could be building anything behind our back.
  const onlyNode = fs.mkdtempSync(path.join(work, 'bin-'));
  fs.symlinkSync(process.execPath, path.join(onlyNode, 'node'));
  const smoke = ['smoke.mjs', '@loopdev/loop', img.path, 'high'];
  const out = JSON.parse(run(path.join(onlyNode, 'node'), smoke, proj, { PATH: onlyNode }));
  t.like(out, { listed: true, error: { isLoopError: true, code: 'ENOENT' } });
  t.deepEqual(await boundAfterSettling(img.path), []);
});

test('node: require works, on every Node version engines admits', (t) => {
  const installed = JSON.parse(fs.readFileSync(path.join(proj, 'node_modules/@loopdev/loop/package.json'), 'utf8'));
  // require(esm) is unflagged from these versions on; engines must not admit older ones.
  t.is(installed.engines.node, '^20.19.0 || >=22.12.0');
  const out = JSON.parse(run(process.execPath, ['require.cjs'], proj));
  t.deepEqual(out, { attach: 'function', listSync: true, LOOP_MAJOR: 7 });
});

test('tsc --strict type-checks await using / using against the installed types', (t) => {
  fs.writeFileSync(
    path.join(proj, 'tsconfig.json'),
    JSON.stringify({
      compilerOptions: {
        strict: true,
        noEmit: true,
        skipLibCheck: false,
        module: 'nodenext',
        moduleResolution: 'nodenext',
        target: 'es2022',
        lib: ['es2022', 'esnext.disposable'],
        types: ['node'],
        typeRoots: [path.join(ROOT, 'node_modules/@types')],
      },
      files: ['using.mts'],
    }),
  );
  t.notThrows(() => run(bin('tsc'), ['-p', 'tsconfig.json'], proj));
});

loopTest('bun add from the registry; the smoke runs without any permission setup', async (t) => {
  const dir = emptyProject('bun-proj');
  const cache = path.join(work, 'bun-cache');
  run(bin('bun'), ['add', '@loopdev/loop'], dir, { BUN_CONFIG_REGISTRY: registry, BUN_INSTALL_CACHE_DIR: cache });
  t.deepEqual(fs.readdirSync(path.join(dir, 'node_modules/@loopdev')).sort(), ['loop', `loop-${TRIPLE}`]);
  const img = image(t);
  const out = JSON.parse(run(bin('bun'), ['smoke.mjs', '@loopdev/loop', img.path, 'high'], dir));
  t.like(out, { listed: true, error: { isLoopError: true, code: 'ENOENT' } });
  t.deepEqual(await boundAfterSettling(img.path), []);
});

/** deno run with `perms` on the smoke; the package comes from our registry via an npm: specifier. */
function deno(perms: string[], img: string, level: string): Record<string, unknown> {
  const dir = emptyProject(`deno-${level}`);
  fs.rmSync(path.join(dir, 'package.json')); // Deno's global npm resolution, as for a plain script
  const args = [
    'run',
    '--quiet',
    // Deno 2.9 skips versions younger than 24 h by default; ours were published a moment ago.
    '--minimum-dependency-age=0',
    ...perms,
    'smoke.mjs',
    'npm:@loopdev/loop',
    img,
    level,
  ];
  const denoEnv = { NPM_CONFIG_REGISTRY: registry, DENO_DIR: path.join(work, 'deno-dir'), DENO_NO_UPDATE_CHECK: '1' };
  return JSON.parse(run(bin('deno'), args, dir, denoEnv)) as Record<string, unknown>;
}

loopTest('deno npm:@loopdev/loop: Loop/LoopControl need only --allow-read --allow-ffi', async (t) => {
  const img = image(t);
  const out = deno(['--allow-read', '--allow-ffi'], img.path, 'low');
  t.like(out, { bound: true, readOnly: true, error: { isLoopError: true, code: 'ENOENT' } });
  t.deepEqual(await boundAfterSettling(img.path), []);
});

loopTest('deno npm:@loopdev/loop: list reads /sys, which Deno grants only with --allow-all, and says so', async (t) => {
  const img = image(t);
  // attach reads what it needs natively; list() must fail rather than report nothing bound.
  const denied = t.throws(() => deno(['--allow-read', '--allow-ffi', '--allow-sys', '--allow-env'], img.path, 'high'));
  t.regex(denied?.message ?? '', /\/sys\/block/, 'the error names what could not be read');
  t.deepEqual(await boundAfterSettling(img.path), [], 'the device attach made was detached on the way out');
  const out = deno(['--allow-all'], img.path, 'high');
  t.like(out, { listed: true, error: { isLoopError: true, code: 'ENOENT' } });
  t.deepEqual(await boundAfterSettling(img.path), []);
});

test('without the optional dependency: the CLI helps, and the library names the package to install', (t) => {
  const dir = emptyProject('omit');
  run('npm', ['install', '--omit=optional', '@loopdev/loop'], dir);
  t.deepEqual(fs.readdirSync(path.join(dir, 'node_modules/@loopdev')), ['loop']);
  t.regex(run('npx', ['--no-install', 'loopdev', '--help'], dir), /^Usage: loopdev COMMAND/m);
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', "await import('@loopdev/loop')"], {
    cwd: dir,
    env,
    encoding: 'utf8',
  });
  t.is(r.status, 1);
  t.regex(r.stderr, /code: 'ERR_LOOP_NATIVE_MISSING'/);
  t.regex(r.stderr, new RegExp(`install ${PKG}`));
});

test('publint and attw pass on the published tarball', (t) => {
  const tgz = path.join(work, run('npm', ['pack', '--silent', '--pack-destination', work, '@loopdev/loop'], work).trim());
  t.notThrows(() => run(bin('publint'), ['run', '--strict', tgz], work));
  // The one rule ignored is explained in README (Packaging): the package is ESM-only on purpose.
  t.notThrows(() => run(bin('attw'), [tgz, '--ignore-rules', 'cjs-resolves-to-esm'], work));
});

test('npm pack from a fresh clone builds and ships the JS, the .d.ts files and LICENSE', (t: ExecutionContext) => {
  // The tracked (and new, unignored) files only: no dist/, no .node, as after `git clone` + setup's npm ci.
  const clone = path.join(work, 'clone');
  const files = execFileSync('git', ['ls-files', '-z', '--cached', '--others', '--exclude-standard'], {
    cwd: ROOT,
    encoding: 'utf8',
  }).split('\0');
  for (const f of files.filter(Boolean)) {
    if (!fs.existsSync(path.join(ROOT, f))) continue; // deleted, not yet committed
    fs.mkdirSync(path.dirname(path.join(clone, f)), { recursive: true });
    fs.copyFileSync(path.join(ROOT, f), path.join(clone, f));
  }
  fs.symlinkSync(path.join(ROOT, 'node_modules'), path.join(clone, 'node_modules'));
  const [packed] = JSON.parse(run('npm', ['pack', '--json', '--dry-run'], clone)) as [{ files: { path: string }[] }];
  const shipped = packed.files.map((f) => f.path);
  for (const f of ['LICENSE', 'README.md', 'package.json', 'dist/index.js', 'dist/index.d.ts', 'dist/cli.js', 'dist/load.js']) {
    t.true(shipped.includes(f), `${f} in the tarball`);
  }
  t.deepEqual(shipped.filter((f) => /^(ts|__test__|crates|npm|scripts)\/|\.node$|\.rs$/.test(f)), []);
});
