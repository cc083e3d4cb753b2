/**
 * The remote loop server under 1,000 malformed packets (bad JSON, no fds, missing keys, wrong indices,
 * wrong fd types, oversized, truncated, memfd abuse, hang-ups): each one gets an exception reply or a
 * clean close, and afterwards the server still attaches correctly and holds no extra file descriptor.
 * Alone in its file and serial, because it counts this process's open fds.
 */
import { spawn } from 'node:child_process';
import * as path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { LoopClient, LoopServer } from '../ts/index.js';
import { boundAfterSettling, image, loopTest, openFds, sysfs, until } from './helpers.js';

const PEER = fileURLToPath(new URL('./fixtures/osbuild_remoteloop.py', import.meta.url));
const COUNT = 1000;

type Report = {
  counts: Record<string, number>;
  cases: Record<string, Record<string, number>>;
  devices: string[];
  errnos: Record<string, string[]>;
};

async function fuzz(socketPath: string, file: string, dir: string): Promise<Report> {
  const child = spawn('python3', [PEER, 'fuzz', socketPath, '--file', file, '--dir', dir, '--count', String(COUNT)], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const lines: string[] = [];
  for await (const line of createInterface({ input: child.stdout })) lines.push(line);
  await new Promise((resolve) => (child.exitCode !== null ? resolve(null) : child.once('close', resolve)));
  if (child.exitCode !== 0 || lines.length !== 1) {
    throw new Error(`fuzzer failed (${child.exitCode}): ${lines.join('\n')}`);
  }
  return JSON.parse(lines[0]!) as Report;
}

const TITLE = `${COUNT} malformed packets: each refused or closed, then the server still works with no fd leaked`;

loopTest.serial(TITLE, async (t) => {
  t.timeout(180_000);
  const img = image(t);
  const before = openFds();
  const srv = new LoopServer({ socketPath: path.join(img.dir, 'remoteloop') });
  t.teardown(() => srv.close());
  await srv.listen();
  const client = new LoopClient(srv.socketPath);
  t.teardown(() => client.close());

  // Warm-up: starts a worker and pins one device, so what follows is steady state.
  (await client.device(img.path, { devDir: img.dir })).removeSync();
  const baseline = openFds();

  const report = await fuzz(srv.socketPath, img.path, img.dir);
  t.log(JSON.stringify(report.counts));
  t.deepEqual(report.devices, [], 'no malformed request got a device');
  const { exception = 0, closed = 0, hangup = 0, ...other } = report.counts;
  t.deepEqual(other, { device: 0 }, 'no other outcome than an exception reply or a close');
  t.is(exception + closed + hangup, COUNT);
  t.true(exception > 0.9 * COUNT, 'nearly all get an exception reply');
  for (const [name, outcomes] of Object.entries(report.cases)) {
    const expected = name === 'empty_packet' ? ['closed'] : name === 'hangup' ? ['hangup'] : ['exception'];
    t.deepEqual(Object.keys(outcomes), expected, `${name}: ${JSON.stringify(outcomes)}`);
  }
  t.true(Object.keys(report.cases).length >= 30, 'every kind of malformed packet was sent');
  // Each kind is refused for its own reason: the errno in the exception's `[Errno N]` value.
  const errno: Record<string, number> = {
    too_many_fds: 7, // E2BIG
    marker_too_many: 7,
    oversized: 90, // EMSGSIZE
    marker_oversized: 90,
    backing_is_o_path: 9, // EBADF
    dir_is_file: 20, // ENOTDIR
    dir_is_pipe: 20,
    dir_is_chardev: 20,
  };
  for (const [name, seen] of Object.entries(report.errnos)) {
    t.deepEqual(seen, [`[Errno ${errno[name] ?? 22}]`], name); // EINVAL unless listed
  }

  await until('the fuzzer connections to close', () => srv.stats().connections === 1);
  await until('the fd count to return to the baseline', () => openFds() === baseline);
  // A request whose peer hung up is answered only if a worker took it before the hang-up was seen.
  const stats = srv.stats();
  t.like(stats, { running: true, devices: 1 });
  t.true(stats.failures >= exception && stats.failures <= exception + hangup, `${stats.failures} failures`);

  await using dev = await client.device(img.path, { devDir: img.dir, offset: 4096 });
  const minor = Number(dev.devname.slice(4));
  t.is(sysfs(minor, 'loop/backing_file'), img.path);
  t.is(sysfs(minor, 'loop/offset'), '4096');
  // The server keeps three fds per device it holds: the device, the directory its node is in and the bind
  // mount it made there (to undo exactly those when the connection closes). It drops the request's other
  // fds once its reply left.
  await until('one more held device, nothing else', () => openFds() === baseline + 3);
  await dev.remove();

  client.close();
  await srv.close();
  t.deepEqual(await boundAfterSettling(img.dir), [], 'every device released on close');
  await until('all of the server fds to close', () => openFds() === before);
});
