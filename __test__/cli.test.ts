import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { LoopClient, LoopDevice } from '../ts/index.js';
import { cli, losetupList, partitionImage, ROOT, sparseFile, spawnCli, type CliResult } from './fixtures.js';
import { devicesBoundUnder, loopTest, sysfs, tempDir } from './helpers.js';
import test from 'ava';

const MiB = 1 << 20;

/** Exit 1 with exactly one line on stderr, nothing on stdout, no stack trace. */
function failsWithOneLine(t: import('ava').ExecutionContext, r: CliResult, pattern: RegExp): void {
  t.is(r.code, 1, r.stderr);
  t.is(r.stdout, '');
  const lines = r.stderr.split('\n').filter(Boolean);
  t.is(lines.length, 1, r.stderr);
  t.regex(lines[0] ?? '', pattern);
  t.notRegex(r.stderr, /^\s+at /m, 'no stack trace');
}

/** The demo's temp dirs under `tmp` (tsx keeps its cache in TMPDIR too). */
function demoDirs(tmp: string): string[] {
  return fs.readdirSync(tmp).filter((e) => e.startsWith('loopdev-demo-'));
}

/** Detaches a device the CLI attached for this test, if the test did not. */
function cleanupDevice(t: import('ava').ExecutionContext, devPath: string, file: string): void {
  t.teardown(async () => {
    if (devicesBoundUnder(file).includes(devPath)) await LoopDevice.open(devPath).detach(5000).catch(() => undefined);
  });
}

loopTest('attach leaves the device bound (no autoclear) after exit; detach releases it', async (t) => {
  const file = sparseFile(tempDir(t), 8 * MiB);
  const r = await cli(['attach', '--partscan', '--offset', '1M', '--sizelimit', '4MiB', file]);
  t.is(r.code, 0, r.stderr);
  t.is(r.stderr, '');
  const devPath = r.stdout.trim();
  t.regex(devPath, /^\/dev\/loop\d+$/);
  cleanupDevice(t, devPath, file);
  const minor = Number(devPath.replace('/dev/loop', ''));
  t.is(sysfs(minor, 'loop/backing_file'), file, 'still bound after the CLI exited');
  t.is(sysfs(minor, 'loop/autoclear'), '0');
  t.is(sysfs(minor, 'loop/partscan'), '1');
  t.is(sysfs(minor, 'loop/offset'), String(MiB));
  t.is(sysfs(minor, 'loop/sizelimit'), String(4 * MiB));
  t.is(sysfs(minor, 'loop/dio'), '1');

  const info = await cli(['info', devPath]);
  t.is(info.code, 0, info.stderr);
  t.regex(info.stdout, new RegExp(`backing file\\s+${file}`));
  t.regex(info.stdout, /flags\s+read-write, direct-io, partscan/);

  const d = await cli(['detach', devPath]);
  t.is(d.code, 0, d.stderr);
  t.is(d.stdout + d.stderr, '');
  t.deepEqual(devicesBoundUnder(file), [], 'detached, verified');
});

loopTest('attach --json prints the device with losetup field names and values', async (t) => {
  const file = sparseFile(tempDir(t), 8 * MiB);
  const r = await cli(['attach', '--json', '-r', '--sector-size', '4096', '--no-direct-io', file]);
  t.is(r.code, 0, r.stderr);
  const entry = JSON.parse(r.stdout) as Record<string, unknown>;
  cleanupDevice(t, String(entry.name), file);
  const expected = losetupList({ devices: [String(entry.name)] }).get(String(entry.name));
  t.truthy(expected);
  for (const [k, v] of Object.entries(expected ?? {})) t.deepEqual(entry[k], v, k);
  t.like(entry, { ro: true, dio: false, 'log-sec': 4096, 'back-file': file, size: 8 * MiB, partitions: [] });
  const d = await cli(['detach', String(entry.name)]);
  t.is(d.code, 0, d.stderr);
  t.deepEqual(devicesBoundUnder(file), []);
});

loopTest('info --json of an attached device; info/detach of unbound or bogus devices fail in one line', async (t) => {
  const dir = tempDir(t);
  const file = sparseFile(dir, 4 * MiB);
  const a = await cli(['attach', file]);
  const devPath = a.stdout.trim();
  cleanupDevice(t, devPath, file);
  const info = await cli(['info', '--json', path.basename(devPath)]);
  t.is(info.code, 0, info.stderr);
  t.like(JSON.parse(info.stdout), { name: devPath, 'back-file': file, size: 4 * MiB });
  t.is((await cli(['detach', devPath])).code, 0);

  failsWithOneLine(t, await cli(['info', 'loop999999']), /^loopdev: ENOENT: no such loop device/);
  failsWithOneLine(t, await cli(['detach', 'loop999999']), /^loopdev: ENOENT/);
  failsWithOneLine(t, await cli(['info', '/etc/hostname']), /^loopdev: ENODEV: not a loop device/);
  failsWithOneLine(t, await cli(['detach', file]), /^loopdev: ENODEV: not a loop device/);
});

test('usage errors and failed attaches exit 1 with one line, no stack trace', async (t) => {
  const dir = tempDir(t);
  const empty = sparseFile(dir, 0, 'empty.img');
  // Not a command: a losetup command line, where a lone word is a device.
  failsWithOneLine(t, await cli(['bogus']), /^loopdev: bogus: failed to use device: ENOENT/);
  failsWithOneLine(t, await cli(['attach']), /^loopdev attach: missing FILE/);
  failsWithOneLine(t, await cli(['attach', 'a', 'b']), /^loopdev attach: expected exactly one FILE/);
  failsWithOneLine(t, await cli(['attach', '--bogus', 'x']), /^loopdev attach: unrecognized option '--bogus' \(see "loopdev attach --help"\)$/);
  failsWithOneLine(t, await cli(['attach', '--offset', 'lots', 'x']), /^loopdev: invalid --offset 'lots': expected bytes like 4096, 1M/);
  failsWithOneLine(t, await cli(['detach']), /^loopdev detach: missing DEV/);
  failsWithOneLine(t, await cli(['serve']), /^loopdev serve: missing --socket PATH/);
  if (process.getuid?.() === 0 && fs.existsSync('/dev/loop-control')) {
    const missing = path.join(dir, 'missing.img');
    failsWithOneLine(t, await cli(['attach', missing]), /^loopdev: ENOENT: no such file or directory/);
    failsWithOneLine(t, await cli(['attach', dir]), /^loopdev: EISDIR/);
    failsWithOneLine(t, await cli(['attach', empty]), /^loopdev: EINVAL: backing file is empty/);
    failsWithOneLine(t, await cli(['attach', '-o', '1G', empty]), /^loopdev: EINVAL/);
  }
  t.deepEqual(devicesBoundUnder(dir), []);
});

test('--help for every command exits 0 and shows its usage', async (t) => {
  const main = await cli(['--help']);
  t.is(main.code, 0);
  t.regex(main.stdout, /^loopdev — /);
  for (const command of ['attach', 'detach', 'list', 'info', 'serve', 'demo']) {
    t.regex(main.stdout, new RegExp(`^  ${command} `, 'm'));
    const r = await cli([command, '--help']);
    t.is(r.code, 0, command);
    t.regex(r.stdout, new RegExp(`^Usage: loopdev ${command}`), command);
    t.is(r.stderr, '');
    t.deepEqual((await cli(['help', command])).stdout, r.stdout);
  }
  const v = await cli(['--version']);
  const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { version: string };
  t.is(v.stdout.trim(), pkg.version);
});

loopTest('serve answers an osbuild-style client and releases everything on SIGTERM', async (t) => {
  const dir = tempDir(t);
  const file = sparseFile(dir, 4 * MiB);
  const sock = path.join(dir, 'loop.sock');
  const devDir = fs.mkdtempSync(path.join(dir, 'dev-'));
  const child = spawnCli(['serve', '--socket', sock]);
  let stderr = '';
  const exit = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
  t.teardown(() => {
    if (child.exitCode === null) child.kill('SIGKILL');
  });
  await new Promise<void>((resolve, reject) => {
    child.stderr.on('data', (d: Buffer) => {
      stderr += d.toString();
      if (stderr.includes('listening on')) resolve();
    });
    void exit.then((code) => reject(new Error(`serve exited with ${code}: ${stderr}`)));
  });
  t.regex(stderr, new RegExp(`^loopdev serve: listening on ${sock}\\n`));
  {
    using client = new LoopClient(sock);
    await using remote = await client.device(file, { readOnly: true, devDir });
    t.true(fs.statSync(remote.path).isBlockDevice());
    const minor = Number(remote.devname.replace('loop', ''));
    t.is(sysfs(minor, 'loop/backing_file'), file);
    t.is(sysfs(minor, 'ro'), '1');
  }
  child.kill('SIGTERM');
  t.is(await exit, 0, stderr);
  t.regex(stderr, /stopped \(SIGTERM\); devices released/);
  t.false(fs.existsSync(sock), 'socket removed');
  t.deepEqual(devicesBoundUnder(file), []);
});

loopTest('list prints a table with losetup\'s columns', async (t) => {
  const file = sparseFile(tempDir(t), 4 * MiB);
  const a = await cli(['attach', '-r', file]);
  const devPath = a.stdout.trim();
  cleanupDevice(t, devPath, file);
  const r = await cli(['list']);
  t.is(r.code, 0, r.stderr);
  const [head, ...rows] = r.stdout.trimEnd().split('\n');
  t.regex(head ?? '', /^NAME\s+SIZELIMIT\s+OFFSET\s+AUTOCLEAR\s+RO\s+BACK-FILE\s+DIO\s+LOG-SEC$/);
  const row = rows.find((l) => l.startsWith(`${devPath} `));
  t.regex(row ?? '', new RegExp(`^${devPath}\\s+0\\s+0\\s+0\\s+1\\s+${file}\\s+1\\s+512$`));
  t.is((await cli(['detach', devPath])).code, 0);
});

loopTest('demo runs end to end and leaves nothing behind', async (t) => {
  const tmp = tempDir(t);
  const r = await cli(['demo'], { TMPDIR: tmp });
  t.is(r.code, 0, r.stderr);
  t.log(r.stdout.trimEnd());
  t.regex(r.stdout, /attached\s+\/dev\/loop\d+: 64 MiB, 512-byte sectors, read-only/);
  t.regex(r.stdout, /detached\s+\/dev\/loop\d+/);
  t.regex(r.stdout, /image\s+unchanged/);
  t.regex(r.stdout, /read\s+.*(ext4 magic 0xef53|Hello)/);
  t.deepEqual(demoDirs(tmp), [], 'temp dir removed');
  t.deepEqual(devicesBoundUnder(tmp), []);
});

loopTest('demo interrupted with Ctrl-C (SIGINT) while attached cleans up and exits 130', async (t) => {
  const tmp = tempDir(t);
  const child = spawnCli(['demo'], { TMPDIR: tmp, LOOPDEV_DEMO_HOLD_MS: '10000' });
  let stdout = '';
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const attachedLine = new Promise<void>((resolve) => {
    child.stdout.on('data', (d: Buffer) => {
      stdout += d.toString();
      if (/attached\s+\/dev\/loop/.test(stdout)) resolve();
    });
  });
  const exit = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
  await Promise.race([attachedLine, exit]);
  const bound = devicesBoundUnder(tmp);
  t.is(bound.length, 1, `attached: ${stdout}${stderr}`);
  child.kill('SIGINT');
  t.is(await exit, 130, stderr);
  t.regex(stderr, /interrupted \(SIGINT\); nothing left behind/);
  t.deepEqual(devicesBoundUnder(tmp), []);
  t.deepEqual(demoDirs(tmp), []);
});

loopTest('demo failing after the attach (injected EIO) cleans up and exits 1 with one line', async (t) => {
  const tmp = tempDir(t);
  const preload = path.join(tmp, 'eio.cjs');
  fs.writeFileSync(
    preload,
    `const fs = require('fs'); const open = fs.openSync;
fs.openSync = (p, ...rest) => {
  if (!String(p).startsWith('/dev/loop')) return open(p, ...rest);
  throw Object.assign(new Error("EIO: i/o error, open '" + p + "'"), { code: 'EIO' });
};
require('module').syncBuiltinESMExports();`,
  );
  const r = await cli(['demo'], { TMPDIR: tmp }, ['--require', preload]);
  t.is(r.code, 1);
  t.regex(r.stdout, /attached\s+\/dev\/loop/);
  t.regex(r.stderr, /^loopdev: EIO: i\/o error, open '\/dev\/loop\d+'\n$/);
  t.deepEqual(devicesBoundUnder(tmp), []);
  t.deepEqual(demoDirs(tmp), []);
});

loopTest('attach -P prints the partitions it made; info lists them, --json with sfdisk --json field names', async (t) => {
  const dir = tempDir(t);
  const file = sparseFile(dir, 8 << 20);
  partitionImage(file);
  const attached = await cli(['attach', '-P', file]);
  t.is(attached.code, 0, attached.stderr);
  const [devPath, ...lines] = attached.stdout.trimEnd().split('\n');
  t.deepEqual(lines, [
    `  ${devPath}p1  start 1 MiB  size 1 MiB  linux-generic`,
    `  ${devPath}p2  start 2 MiB  size 6 MiB  linux-generic`,
  ]);
  const info = await cli(['info', devPath!]);
  t.regex(info.stdout, new RegExp(`partition table  dos 0x[0-9a-f]{8}\\n  ${devPath}p1  start 1 MiB`));
  const json = JSON.parse((await cli(['info', '--json', devPath!])).stdout);
  const sfdisk = JSON.parse(execFileSync('sfdisk', ['--json', file], { encoding: 'utf8' })).partitiontable;
  t.is(json.partitiontable.label, sfdisk.label);
  t.is(json.partitiontable.id, sfdisk.id);
  t.deepEqual(
    json.partitiontable.partitions.map((p: { start: number; size: number; type: string }) => [p.start, p.size, p.type]),
    sfdisk.partitions.map((p: { start: number; size: number; type: string }) => [p.start, p.size, p.type]),
  );
  const detached = await cli(['detach', '--wait', devPath!]);
  t.is(detached.code, 0, detached.stderr);
  t.false(fs.existsSync(`${devPath}p1`), 'the partitions went with the device');
});

loopTest('serve --allow-uid replaces the default (our uid and root): root is refused unless listed', async (t) => {
  const dir = tempDir(t);
  const file = sparseFile(dir, 4 * MiB);
  for (const [uids, rootAllowed] of [[['65534'], false], [['65534', '0'], true]] as const) {
    const sock = path.join(dir, `loop-${uids.join('-')}.sock`);
    const child = spawnCli(['serve', '-q', '--socket', sock, ...uids.flatMap((u) => ['--allow-uid', u])]);
    t.teardown(() => {
      if (child.exitCode === null) child.kill('SIGKILL');
    });
    let stderr = '';
    await new Promise<void>((resolve) =>
      child.stderr.on('data', (d: Buffer) => {
        stderr += d.toString();
        if (stderr.includes('listening on')) resolve();
      }),
    );
    {
      using client = new LoopClient(sock);
      const asked = client.device(file, { devDir: dir });
      if (rootAllowed) await (await asked).remove();
      else await t.throwsAsync(asked, { code: 'EPERM', message: /uid 0 is not allowed/ });
    }
    const exit = new Promise((resolve) => child.on('close', resolve));
    child.kill('SIGTERM');
    t.is(await exit, 0, stderr);
  }
});
