/**
 * `loopdev` given losetup's command lines, compared with util-linux's losetup (the oracle; the expectations
 * hold for util-linux 2.38.1, Debian 12) on devices and images each test creates itself. Listings of every
 * device include other sessions' devices and come in /sys/block directory order in losetup, so those are
 * compared on our rows only; one-device and one-file listings are compared byte for byte.
 * Never `-D`, never a device this file did not attach.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { cli, losetupAttach, type CliResult } from './fixtures.js';
import { LoopControl } from '../ts/index.js';
import { boundAfterSettling, devicesBoundUnder, image, loopTest, sysfs, tempDir } from './helpers.js';
import test, { type ExecutionContext } from 'ava';

const MiB = 1 << 20;

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

function losetup(args: string[]): Run {
  const r = spawnSync('losetup', args, { encoding: 'utf8' });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** Same stdout and exit status from losetup and loopdev for `args`. */
async function same(t: ExecutionContext, args: string[]): Promise<CliResult> {
  const want = losetup(args);
  const got = await cli(args);
  t.is(got.code, want.code, `exit status of ${args.join(' ')}: ${got.stderr}`);
  t.is(got.stdout, want.stdout, `stdout of ${args.join(' ')}`);
  return got;
}

/** Exit 1 and one line on stderr naming what was wrong, like losetup's; nothing bound. */
async function refused(t: ExecutionContext, args: string[], message: RegExp): Promise<void> {
  t.is(losetup(args).code, 1, `losetup ${args.join(' ')} fails too`);
  const r = await cli(args);
  t.is(r.code, 1, `${args.join(' ')}: ${r.stderr}`);
  t.is(r.stdout, '');
  const lines = r.stderr.split('\n').filter(Boolean);
  t.is(lines.length, 1, r.stderr);
  t.regex(lines[0] ?? '', message);
}

const minor = (dev: string) => Number(dev.replace('/dev/loop', ''));

/** A device's state as losetup shows it, without its name (two devices set up alike compare equal). */
function state(dev: string): string {
  const cols = 'OFFSET,SIZELIMIT,RO,PARTSCAN,DIO,LOG-SEC,AUTOCLEAR,BACK-FILE,BACK-INO';
  return losetup(['--list', '--raw', '-n', '-O', cols, dev]).stdout;
}

function detach(t: ExecutionContext, ...devs: string[]): void {
  const r = losetup(['-d', ...devs]);
  t.is(r.code, 0, r.stderr);
}

loopTest('listings of our devices are byte-identical: table, --raw, -n, -J, -O, --output-all, short form', async (t) => {
  const dir = tempDir(t);
  const a = path.join(dir, 'a.img');
  const b = path.join(dir, 'b c.img'); // a blank, which --raw escapes
  for (const f of [a, b]) fs.writeFileSync(f, Buffer.alloc(0)), fs.truncateSync(f, 8 * MiB);
  const da = losetupAttach(a, ['-o', '1M', '--sizelimit', '2M']);
  const db = losetupAttach(b, ['-r', '-P', '-b', '4096']);
  for (const dev of [da, db]) {
    for (const args of [
      [dev],
      ['--output-all', dev],
      ['-J', dev],
      ['-l', dev],
      ['-l', '-n', dev],
      ['-l', '--raw', dev],
      ['-l', '--raw', '-n', dev],
      ['-l', '-J', dev],
      ['-l', '--output-all', dev],
      ['-l', '--output-all', '-J', dev],
      ['-l', '--output-all', '--raw', dev],
      ['-O', 'NAME,MAJ:MIN,BACK-MAJ:MIN,BACK-INO', dev],
      ['-O', 'name,back-file', dev],
      ['-O', 'BACK-FILE,NAME', '-J', dev],
    ]) {
      await same(t, args);
    }
  }
  for (const args of [
    ['-j', a],
    ['-j', b],
    ['--associated', a, '-o', '1M'],
    ['-j', a, '-o', '2M'],
    ['-j', a, '-l'],
    ['-j', b, '--list', '--raw'],
    ['-j', a, '-l', '-J'],
    ['-j', a, '-J', '-l', '-o', '2M'],
    ['-j', path.join(dir, 'missing.img')],
  ]) {
    await same(t, args);
  }
  // Every device: compare the rows of ours, blanks squeezed (column widths depend on everyone's rows).
  const ours = (text: string) =>
    text
      .split('\n')
      .filter((l) => l.startsWith(`${da}:`) || l.startsWith(`${db}:`) || l.startsWith(`${da} `) || l.startsWith(`${db} `))
      .map((l) => l.replace(/ +/g, ' '))
      .sort();
  for (const args of [['-a'], ['-l'], ['-l', '-n'], ['--raw'], ['-l', '--raw', '-n'], ['--list', '--output-all']]) {
    const want = losetup(args);
    const got = await cli(args);
    t.is(got.code, want.code, args.join(' '));
    t.deepEqual(ours(got.stdout), ours(want.stdout), args.join(' '));
    t.is(ours(got.stdout).length, 2, `${args.join(' ')} lists both of ours`);
    if (!args.includes('-n') && args.length > 1 && !args.includes('-a')) {
      t.is(got.stdout.split('\n')[0]!.replace(/ +/g, ' '), want.stdout.split('\n')[0]!.replace(/ +/g, ' '));
    }
  }
  for (const args of [['-J'], ['-l', '-J']]) {
    const pick = (text: string) =>
      (JSON.parse(text) as { loopdevices: { name: string }[] }).loopdevices
        .filter((e) => e.name === da || e.name === db)
        .sort((x, y) => x.name.localeCompare(y.name));
    const want = losetup(args);
    const got = await cli(args);
    t.is(got.code, want.code);
    t.deepEqual(pick(got.stdout), pick(want.stdout), args.join(' '));
  }
  // Two devices of one file: losetup orders them as /sys/block's directory does, so the lines are compared
  // as multisets (which still sees every separator, e.g. JSON's `},{`).
  const c = path.join(dir, 'c.img');
  fs.writeFileSync(c, Buffer.alloc(0)), fs.truncateSync(c, 8 * MiB);
  const dc = [losetupAttach(c), losetupAttach(c, ['-o', '4M'])];
  const lines = (text: string) => text.split('\n').sort();
  for (const args of [['-j', c], ['-j', c, '-l'], ['-j', c, '-l', '-J'], ['-j', c, '-l', '--raw', '--output-all']]) {
    const want = losetup(args);
    const got = await cli(args);
    t.is(got.code, want.code);
    t.deepEqual(lines(got.stdout), lines(want.stdout), args.join(' '));
  }
  detach(t, ...dc);
  // The subcommand is the same listing.
  t.is((await cli(['list', '--output-all', '--raw', da])).stdout, losetup(['-l', '--output-all', '--raw', da]).stdout);
  detach(t, da, db);
});

loopTest('attach command lines set devices up as losetup does, and -d detaches several at once', async (t) => {
  const img = image(t, 8 * MiB);
  for (const args of [
    ['-f', '--show'],
    ['--find', '--show', '-o', '1M', '--sizelimit', '2M', '-P', '-r'],
    ['-fP', '--show', '-b', '4096', '--direct-io'],
    ['-f', '--show', '--direct-io=off', '-o', '1.5M', '--sizelimit=1MiB'],
    ['--sho', '--fi', '--sizel', '0x100000', '-o', '010'],
    // (An offset past the end: losetup binds an empty device, loopdev's attach() refuses it: not compared.)
    ['-f', '--show', '--sizelimit', '1P'],
    ['-f', '--show', '--sizelimit', '1E', '-o', '2MB'],
    ['-f', '-r'],
  ]) {
    const added = (before: string[]) => devicesBoundUnder(img.path).filter((d) => !before.includes(d));
    const before = devicesBoundUnder(img.path);
    const want = losetup([...args, img.path]);
    const [wantDev] = added(before);
    const got = await cli([...args, img.path]);
    const [gotDev] = added([...before, wantDev!]);
    t.is(got.code, want.code, `${args.join(' ')}: ${got.stderr}`);
    t.is(want.code, 0, want.stderr);
    const shows = args.some((a) => a.startsWith('--sho'));
    t.is(got.stdout, shows ? `${gotDev}\n` : '', args.join(' '));
    t.is(want.stdout, shows ? `${wantDev}\n` : '');
    t.is(state(gotDev!), state(wantDev!), `${args.join(' ')}: loopdev ${gotDev} vs losetup ${wantDev}`);
    const d = await cli(['-d', gotDev!, wantDev!]);
    t.is(d.code, 0, d.stderr);
    t.deepEqual(devicesBoundUnder(img.path), [], 'both detached');
  }
});

// Serial: the other tests here attach devices, which moves the next free one between the two calls.
loopTest.serial('-f prints the device losetup would pick; DEV FILE binds that device; -c and DEV -b/--direct-io change it', async (t) => {
  for (let attempt = 0; ; attempt++) {
    // Another test may take the free device between the two calls: retry until they agree.
    const want = losetup(['-f']);
    const got = await cli(['-f']);
    t.is(got.code, 0);
    if (got.stdout === want.stdout || attempt === 10) {
      t.is(got.stdout, want.stdout);
      break;
    }
  }
  const img = image(t, 4 * MiB);
  // A high minor that neither losetup's nor loopdev's free-device search hands to other tests.
  let dev = '';
  for (let n = 4000 + (process.pid % 1000); !dev; n++) {
    if (fs.existsSync(`/sys/block/loop${n}/loop`)) continue;
    const r = await cli([`/dev/loop${n}`, img.path]);
    if (r.code === 0) dev = `/dev/loop${n}`;
  }
  t.is(sysfs(minor(dev), 'loop/backing_file'), img.path);
  t.is(sysfs(minor(dev), 'loop/dio'), '0', "losetup's default: buffered I/O");
  fs.truncateSync(img.path, 8 * MiB);
  await same(t, ['-c', dev]);
  t.is(sysfs(minor(dev), 'size'), String((8 * MiB) / 512), '-c re-read the size');
  t.is((await cli([dev, '-b', '4096'])).code, 0);
  t.is(sysfs(minor(dev), 'queue/logical_block_size'), '4096');
  t.is((await cli([dev, '--direct-io=on'])).code, 0);
  t.is(sysfs(minor(dev), 'loop/dio'), '1');
  t.is((await cli([dev, '--direct-io=off'])).code, 0);
  t.is(sysfs(minor(dev), 'loop/dio'), '0');
  t.is((await cli(['-d', dev])).code, 0);
  t.deepEqual(await boundAfterSettling(img.dir), []);
  // The node was made for this test (losetup would leave it too): remove it so runs do not pile them up.
  using ctl = new LoopControl();
  t.notThrows(() => ctl.remove(minor(dev)));
});

loopTest('-L reuses the device with the same offset and size limit, and refuses an overlapping one', async (t) => {
  const img = image(t, 8 * MiB);
  const dev = losetupAttach(img.path, ['-o', '1M', '--sizelimit', '2M']);
  await same(t, ['-L', '-f', '--show', '-o', '1M', '--sizelimit', '2M', img.path]);
  t.is((await cli(['-L', '-f', '--show', '-o', '1M', '--sizelimit', '2M', img.path])).stdout, `${dev}\n`);
  await refused(t, ['-L', '-f', '--show', '-o', '2M', img.path], /overlapping loop device exists/);
  await refused(t, ['--nooverlap', '-f', img.path], /overlapping loop device exists/);
  t.deepEqual(devicesBoundUnder(img.path), [dev], 'nothing new bound');
  detach(t, dev);
});

test('bad command lines: exit 1 like losetup, one line that says what is allowed, nothing touched', async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'disk.img');
  fs.writeFileSync(file, Buffer.alloc(MiB));
  await refused(t, ['-f', '-o', '-1', file], /^loopdev: invalid --offset '-1': a size cannot be negative/);
  await refused(t, ['-f', '--offset', '-1', file], /^loopdev: invalid --offset '-1': a size cannot be negative/);
  await refused(t, ['-f', '--sizelimit', '1X', file], /^loopdev: invalid --sizelimit '1X': expected bytes like/);
  await refused(t, ['-f', '-o', '16E', file], /^loopdev: invalid --offset '16E': out of range/);
  await refused(t, ['-f', '-b', '3000', file], /^loopdev: invalid --sector-size '3000': this kernel .* accepts a power of two from 512 to \d+$/);
  await refused(t, ['-f', '--sector-size', '256', file], /^loopdev: invalid --sector-size '256'/);
  await refused(t, ['-f', '--direct-io=maybe', file], /^loopdev: invalid --direct-io 'maybe'/);
  await refused(t, ['--bogus'], /^loopdev: unrecognized option '--bogus'/);
  await refused(t, ['--s', file], /^loopdev: option '--s' is ambiguous/);
  await refused(t, ['-d'], /^loopdev: option requires an argument -- 'd'/);
  await refused(t, ['-l', '-O', 'BOGUS'], /^loopdev: unknown column: BOGUS/);
  await refused(t, ['-f', file, 'extra'], /^loopdev: unexpected arguments/);
  await refused(t, ['--show', '-a'], /allowed during loop device setup only/);
  await refused(t, ['-a', '-o', '1M'], /--offset is not allowed in this context/);
  await refused(t, ['-j'], /option requires an argument -- 'j'/);
  await refused(t, ['-d', '/dev/loop999999'], /^loopdev: /);
  await refused(t, ['-c', file], /failed to use device/);
  await refused(t, ['-f', '--show', path.join(dir, 'missing.img')], /missing\.img: failed to set up loop device: ENOENT/);
  const a = await cli(['attach', '--offset', '-1', file]);
  t.is(a.code, 1);
  t.regex(a.stderr, /^loopdev: invalid --offset '-1': a size cannot be negative/);
  t.notRegex(a.stderr, /ambiguous/);
  const s = await cli(['attach', '-b', '3000', file]);
  t.regex(s.stderr, /^loopdev: invalid --sector-size '3000': this kernel .* accepts a power of two from 512 to/);
  t.deepEqual(devicesBoundUnder(dir), []);
});

test('no arguments: usage on stderr and exit status 1', async (t) => {
  const r = await cli([]);
  t.is(r.code, 1);
  t.is(r.stdout, '');
  t.regex(r.stderr, /^loopdev — .*\n\nUsage: loopdev COMMAND/);
});
