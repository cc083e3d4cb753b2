/**
 * Remote loop round trips against in-process allocation, measured in the same run.
 *
 *   npx tsx bench/remote.ts [--requests 50] [--rounds 5]
 *
 *   in-process  `ctl.loopForFdSync(fd, { autoclear: true })` + close (autoclear frees the device at close)
 *   + node      the same plus `lo.mknod(dirFd)` + `removeNode(dirFd, name)`: the kernel work a remote request
 *               does too, so the gap to "remote" is the protocol (socket, fd passing, thread hops, opens)
 *   remote      `await client.device(file, { devDir })` + `dev.remove()`: the client opens the file and the
 *               directory, the server thread does loopForFd(autoclear) + mknod (bind mount of the host node)
 *               and replies, the client removes the node. Devices stay pinned by the server until it
 *               closes, so each round uses a fresh server; "+ release" adds that close (all devices freed).
 * The variants alternate round by round; ratios are medians over rounds of (remote / in-process) in the
 * same round, so machine drift hits both sides. Prints ratios, asserts nothing.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { LoopClient, LoopControl, LoopServer, removeNode } from '../ts/index.js';
import { QUICK, intOption, machine, median, parseArgs, record, scratchImage, table } from './lib.js';

const { opts } = parseArgs();
const requests = intOption(opts, 'requests', QUICK ? 3 : 50);
const rounds = intOption(opts, 'rounds', QUICK ? 1 : 5);
record('remote');
const img = scratchImage();

function inProcess(n: number): number {
  using ctl = new LoopControl();
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < n; i++) ctl.loopForFdSync(img.fd, { autoclear: true }).close();
  return Number(process.hrtime.bigint() - t0) / n;
}

function inProcessWithNode(n: number): number {
  using ctl = new LoopControl();
  const dirFd = fs.openSync(img.dir, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < n; i++) {
    const lo = ctl.loopForFdSync(img.fd, { autoclear: true });
    lo.mknod(dirFd);
    removeNode(dirFd, lo.devname);
    lo.close();
  }
  const t = Number(process.hrtime.bigint() - t0) / n;
  fs.closeSync(dirFd);
  return t;
}

async function remote(n: number, round: number): Promise<{ trip: number; withRelease: number }> {
  const server = new LoopServer({ socketPath: path.join(img.dir, `remoteloop.${round}`) });
  await server.listen();
  const client = new LoopClient(server.socketPath);
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < n; i++) await (await client.device(img.file, { devDir: img.dir })).remove();
  const t1 = process.hrtime.bigint();
  client.close();
  await server.close();
  const t2 = process.hrtime.bigint();
  return { trip: Number(t1 - t0) / n, withRelease: Number(t2 - t0) / n };
}

// Warm-up: loads the addon, creates enough loop minors for a round, faults in the code paths.
inProcess(5);
inProcessWithNode(5);
await remote(Math.min(requests, 10), -1);

const base: number[] = [];
const withNode: number[] = [];
const trip: number[] = [];
const full: number[] = [];
for (let r = 0; r < rounds; r++) {
  const remoteFirst = r % 2 === 1;
  let b = 0;
  let x = { trip: 0, withRelease: 0 };
  if (remoteFirst) x = await remote(requests, r);
  b = inProcess(requests);
  withNode.push(inProcessWithNode(requests));
  if (!remoteFirst) x = await remote(requests, r);
  base.push(b);
  trip.push(x.trip);
  full.push(x.withRelease);
}

const us = (ns: number): string => (ns / 1000).toFixed(0);
const perSec = (ns: number): string => (1e9 / ns).toFixed(0);
const ratio = (xs: number[]): string => `${median(xs.map((x, i) => x / base[i]!)).toFixed(2)}×`;
console.log(`# ${machine()}; ${requests} requests × ${rounds} rounds`);
table([
  ['variant', 'µs/op (median)', 'ops/s', 'vs in-process'],
  ['in-process loopForFd + close', us(median(base)), perSec(median(base)), '1.00×'],
  ['in-process + mknod + removeNode', us(median(withNode)), perSec(median(withNode)), ratio(withNode)],
  ['remote round trip', us(median(trip)), perSec(median(trip)), ratio(trip)],
  ['remote round trip + release', us(median(full)), perSec(median(full)), ratio(full)],
]);
img.cleanup();
