/**
 * The raw native binding, called directly (as anyone who requires the platform package can): handles of the
 * wrong kind, fds JS closes while async work runs, and promises that must settle whatever happens natively.
 */
import type { ExecutionContext } from 'ava';
import { execFileSync } from 'node:child_process';
import { pbkdf2 } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { configureArgs, native, type Handle, type NativeLoop } from '../ts/binding.js';
import { LoopError, UnexpectedDeviceError } from '../ts/errors.js';
import { boundAfterSettling, image, loopTest, mountsUnder, sysfs, tempDir } from './helpers.js';

type Kind = 'control' | 'loop' | 'server' | 'client';

/** Every export that takes a handle first: which kind it wants, and valid other arguments for it. */
const TAKES_HANDLE: Record<string, { wants: Kind[]; args: (fd: number, dirFd: number) => unknown[] }> = {
  close: { wants: ['control', 'loop'], args: () => [] },
  closeAsync: { wants: ['control', 'loop'], args: () => [] },
  controlAdd: { wants: ['control'], args: () => [-1] },
  controlRemove: { wants: ['control'], args: () => [1 << 20] },
  controlGetUnbound: { wants: ['control'], args: () => [] },
  controlLoopForFd: { wants: ['control'], args: (fd) => [fd, [], false] },
  controlLoopForFdAsync: { wants: ['control'], args: (fd) => [fd, [], false] },
  loopFlock: { wants: ['loop'], args: () => [1 /* LOCK_SH */] },
  loopFlushBuf: { wants: ['loop'], args: () => [] },
  loopSetFd: { wants: ['loop'], args: (fd) => [fd] },
  loopClearFd: { wants: ['loop'], args: () => [] },
  loopClearFdWait: { wants: ['loop'], args: (fd) => [fd, 0, 1] },
  loopClearFdWaitAsync: { wants: ['loop'], args: (fd) => [fd, 0, 1] },
  loopDetach: { wants: ['loop'], args: () => [0, 1] },
  loopDetachAsync: { wants: ['loop'], args: () => [0, 1] },
  loopDisposeAsync: { wants: ['loop'], args: () => [0, 1] },
  loopChangeFd: { wants: ['loop'], args: (fd) => [fd] },
  loopIsBoundTo: { wants: ['loop'], args: (fd) => [fd] },
  loopSetStatus: { wants: ['loop'], args: () => [{}] },
  loopGetStatus: { wants: ['loop'], args: () => [] },
  loopConfigure: { wants: ['loop'], args: (fd) => [fd, []] },
  loopConfigureAsync: { wants: ['loop'], args: (fd) => [fd, []] },
  loopSetDirectIo: { wants: ['loop'], args: () => [false] },
  loopSetBlockSize: { wants: ['loop'], args: () => [512] },
  loopSetCapacity: { wants: ['loop'], args: () => [] },
  loopMknod: { wants: ['loop'], args: (_fd, dirFd) => [dirFd, 0o600] },
  loopPartitionTable: { wants: ['loop'], args: () => [] },
  loopAddPartitions: { wants: ['loop'], args: () => [] },
  loopRemovePartition: { wants: ['loop'], args: () => [1] },
  remoteServerClose: { wants: ['server'], args: () => [] },
  remoteServerStats: { wants: ['server'], args: () => [] },
  remoteClientRequest: { wants: ['client'], args: (fd, dirFd) => [fd, dirFd, {}] },
  remoteClientCancel: { wants: ['client'], args: () => [] },
  remoteClientClose: { wants: ['client'], args: () => [] },
};

const NO_HANDLE = ['init', 'controlOpen', 'attach', 'attachAsync', 'loopOpen', 'removeNode', 'blockOpeners', 'blockOpenersAsync', 'remoteServerListen', 'remoteServerAdopt', 'remoteClientConnect'];

type Raw = Record<string, (...args: unknown[]) => unknown>;
const raw = native as unknown as Raw;

/** Calls `f`; a synchronous throw and a rejection both come back as the error, success as undefined. */
async function failure(f: () => unknown): Promise<unknown> {
  try {
    await f();
    return undefined;
  } catch (e) {
    return e;
  }
}

/** One handle of each kind, all ours: the loop is bound to our own image, the server listens in our dir. */
async function handles(t: ExecutionContext): Promise<{ of: Record<Kind, Handle>; fd: number; dirFd: number }> {
  const img = image(t);
  const dirFd = fs.openSync(img.dir, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
  t.teardown(() => fs.closeSync(dirFd));
  const control = native.controlOpen();
  t.teardown(() => native.close(control));
  const lo = native.controlLoopForFd(control, img.fd, [undefined, undefined, undefined, true], false);
  t.teardown(() => native.close(lo.handle));
  const socket = path.join(tempDir(t), 'remoteloop');
  const server = native.remoteServerListen(socket);
  t.teardown(() => native.remoteServerClose(server));
  const client = native.remoteClientConnect(socket);
  t.teardown(() => native.remoteClientClose(client));
  return { of: { control, loop: lo.handle, server, client }, fd: img.fd, dirFd };
}

// Every export is classified, so a new one that takes a handle cannot slip past the checks below.
loopTest('every export is known to take a handle or not', (t) => {
  t.deepEqual(Object.keys(native).sort(), [...Object.keys(TAKES_HANDLE), ...NO_HANDLE].sort());
});

loopTest.serial('a handle of the wrong kind is a TypeError from every function, never a crash', async (t) => {
  const { of, fd, dirFd } = await handles(t);
  let checked = 0;
  for (const [name, { wants, args }] of Object.entries(TAKES_HANDLE)) {
    for (const kind of Object.keys(of) as Kind[]) {
      if (wants.includes(kind)) continue;
      const err = await failure(() => raw[name]!(of[kind], ...args(fd, dirFd)));
      t.true(err instanceof TypeError, `${name}(${kind} handle) → ${String(err)}`);
      t.is((err as NodeJS.ErrnoException).code, 'ERR_INVALID_ARG_TYPE', `${name}(${kind} handle)`);
      t.regex((err as Error).message, /^expected a .* handle$/, `${name}(${kind} handle)`);
      checked++;
    }
  }
  t.true(checked > 60);
  // The refused calls touched nothing: each handle still works as its own kind.
  t.true(native.loopIsBoundTo(of.loop, fd));
  t.is(typeof native.controlGetUnbound(of.control), 'number');
  t.is(native.remoteServerStats(of.server).running, true);
});

loopTest.serial('a value that is no handle at all is a TypeError from every function', async (t) => {
  const { fd, dirFd } = await handles(t);
  const notHandles: Array<[string, unknown]> = [
    ['undefined', undefined],
    ['null', null],
    ['0', 0],
    ['an fd number', fd],
    ['a string', 'handle'],
    ['a plain object', {}],
    ['an array', []],
    ['a function', () => 0],
    ['a Buffer', Buffer.alloc(64)],
    ['a bigint', 1n],
    ['a symbol', Symbol('handle')],
  ];
  for (const [name, { args }] of Object.entries(TAKES_HANDLE)) {
    for (const [what, value] of notHandles) {
      const err = await failure(() => raw[name]!(value, ...args(fd, dirFd)));
      t.true(err instanceof TypeError, `${name}(${what}) → ${String(err)}`);
      t.is((err as NodeJS.ErrnoException).code, 'ERR_INVALID_ARG_TYPE', `${name}(${what})`);
    }
  }
});

loopTest('blockOpeners takes only an array of major:minor strings: anything else is a TypeError', async (t) => {
  for (const name of ['blockOpeners', 'blockOpenersAsync']) {
    for (const value of [undefined, null, 7, '7:0', {}, [7], ['/dev/loop0'], ['7'], ['7:x']]) {
      const err = await failure(() => raw[name]!(value));
      t.true(err instanceof TypeError, `${name}(${JSON.stringify(value)}) → ${String(err)}`);
      t.is((err as NodeJS.ErrnoException).code, 'ERR_INVALID_ARG_TYPE', `${name}(${JSON.stringify(value)})`);
    }
  }
  t.deepEqual(native.blockOpeners([]), []);
});

/**
 * Keeps every libuv pool thread busy for a while, so async work queued next waits in the queue and runs only
 * after the JS code that follows the call: a deterministic "JS acts while the job is pending".
 */
function occupyPool(): Promise<unknown> {
  const threads = Number(process.env.UV_THREADPOOL_SIZE) || 4;
  const busy = () => new Promise((resolve, reject) => pbkdf2('x', 'y', 300_000, 32, 'sha256', (e, k) => (e ? reject(e) : resolve(k))));
  return Promise.all(Array.from({ length: threads }, busy));
}

/**
 * Starts `start(fd)` on a fresh fd for `img`, and before the job can run closes that fd and opens `other`,
 * which gets the same number. Returns the job's promise.
 */
function startThenReuseFd<T>(t: ExecutionContext, img: string, other: string, start: (fd: number) => Promise<T>): Promise<T> {
  const busy = occupyPool();
  const fd = fs.openSync(img, 'r+');
  const job = start(fd);
  fs.closeSync(fd);
  const reused = fs.openSync(other, 'r+');
  t.teardown(() => fs.closeSync(reused));
  t.is(reused, fd, 'the other file got the closed fd number');
  return busy.then(() => job);
}

/** The device `minor` is bound to `file` (same inode, and sysfs names it). */
function assertBoundTo(t: ExecutionContext, handle: Handle, minor: number, file: string): void {
  const st = fs.statSync(file, { bigint: true });
  const info = native.loopGetStatus(handle);
  t.deepEqual([info.device, info.inode], [st.dev, st.ino], `loop${minor} is bound to the inode of ${file}`);
  t.is(sysfs(minor, 'loop/backing_file'), file);
}

const AUTOCLEAR = configureArgs({ autoclear: true });

loopTest.serial('async loopForFd binds the file the fd named at the call, even if JS reuses the number', async (t) => {
  const a = image(t);
  const b = image(t);
  const ctl = native.controlOpen();
  t.teardown(() => native.close(ctl));
  const lo = await startThenReuseFd(t, a.path, b.path, (fd) => native.controlLoopForFdAsync(ctl, fd, AUTOCLEAR, false));
  t.teardown(() => native.close(lo.handle));
  assertBoundTo(t, lo.handle, lo.minor, a.path);
});

loopTest.serial('async configure binds the file the fd named at the call, even if JS reuses the number', async (t) => {
  const a = image(t);
  const b = image(t);
  const ctl = native.controlOpen();
  t.teardown(() => native.close(ctl));
  for (let attempt = 0; ; attempt++) {
    let lo: NativeLoop | undefined;
    try {
      const opened = native.loopOpen(native.controlGetUnbound(ctl));
      lo = opened;
      t.teardown(() => native.close(opened.handle));
      await startThenReuseFd(t, a.path, b.path, (fd) => native.loopConfigureAsync(opened.handle, fd, AUTOCLEAR));
    } catch (e) {
      // Another process took (or removed) the free device first: try the next one.
      const code = (e as { code?: string }).code;
      if ((code === 'EBUSY' || code === 'ENXIO' || code === 'ENOENT') && attempt < 16) continue;
      throw e;
    }
    assertBoundTo(t, lo.handle, lo.minor, a.path);
    return;
  }
});

loopTest.serial('a remote request sends the file the fd named at the call, even if JS reuses the number', async (t) => {
  const a = image(t);
  const b = image(t);
  const nodes = tempDir(t);
  const dirFd = fs.openSync(nodes, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
  t.teardown(() => fs.closeSync(dirFd));
  const socket = path.join(tempDir(t), 'remoteloop');
  const server = native.remoteServerListen(socket);
  t.teardown(() => native.remoteServerClose(server));
  const client = native.remoteClientConnect(socket);
  t.teardown(() => native.remoteClientClose(client));
  const reply = await startThenReuseFd(t, a.path, b.path, (fd) => native.remoteClientRequest(client, fd, dirFd, {}));
  t.is(reply.exception, undefined);
  t.teardown(() => native.removeNode(dirFd, reply.devname!));
  const minor = Number(/^loop(\d+)$/.exec(reply.devname!)![1]);
  t.is(sysfs(minor, 'loop/backing_file'), a.path);
});

/** Settles with 'still pending' if `p` has not settled after `ms`. */
function within<T>(p: Promise<T>, ms: number): Promise<T | 'still pending'> {
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<'still pending'>((resolve) => (timer = setTimeout(() => resolve('still pending'), ms)));
  return Promise.race([p, late]).finally(() => clearTimeout(timer));
}

loopTest.serial('a promise settles even when building its error throws', async (t) => {
  const dir = tempDir(t);
  const dirFd = fs.openSync(dir, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
  t.teardown(() => fs.closeSync(dirFd));
  const ctl = native.controlOpen();
  t.teardown(() => native.close(ctl));
  class Throwing {
    constructor() {
      throw new Error('the error class threw');
    }
  }
  native.init({ LoopError: Throwing, UnexpectedDeviceError: Throwing } as never);
  t.teardown(() => native.init({ LoopError, UnexpectedDeviceError }));
  // A directory is refused (EINVAL) before any device is touched; the LoopError for it cannot be built.
  t.throws(() => native.controlLoopForFd(ctl, dirFd, [], false), { message: 'the error class threw' });
  const settled = within(native.controlLoopForFdAsync(ctl, dirFd, [], false), 5000);
  await t.throwsAsync(settled, { message: 'the error class threw' });
});

const gc = (() => {
  setFlagsFromString('--expose-gc');
  return runInNewContext('gc') as () => void;
})();

/** Polls `done` (collecting garbage in between) until it holds or `ms` pass. */
async function eventually(done: () => boolean, ms: number): Promise<boolean> {
  const deadline = Date.now() + ms;
  while (!done() && Date.now() < deadline) {
    gc();
    await new Promise((r) => setTimeout(r, 20));
  }
  return done();
}

loopTest.serial('a server handle collected without close() still stops the server', async (t) => {
  const socket = path.join(tempDir(t), 'remoteloop');
  ((p: string) => void native.remoteServerListen(p))(socket);
  t.true(fs.existsSync(socket));
  t.true(await eventually(() => !fs.existsSync(socket), 10_000), 'the socket file is removed');
});

loopTest.serial('a server never closed is stopped when node exits, its nodes and devices released', async (t) => {
  const img = image(t);
  const nodes = tempDir(t);
  const socket = path.join(tempDir(t), 'remoteloop');
  const binding = new URL('../ts/binding.ts', import.meta.url).href;
  // The child serves one request and exits with the server, its client and the device all left open.
  const code = `import * as fs from 'node:fs';
const { native } = await import(${JSON.stringify(binding)});
const server = native.remoteServerListen(${JSON.stringify(socket)});
const client = native.remoteClientConnect(${JSON.stringify(socket)});
const fd = fs.openSync(${JSON.stringify(img.path)}, 'r+');
const dirFd = fs.openSync(${JSON.stringify(nodes)}, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
const reply = await native.remoteClientRequest(client, fd, dirFd, {});
console.log(JSON.stringify({ reply, stats: native.remoteServerStats(server) }));`;
  const out = execFileSync(process.execPath, ['--import=tsx', '--input-type=module', '-e', code], { encoding: 'utf8' });
  const { reply, stats } = JSON.parse(out) as { reply: { devname?: string }; stats: { devices: number } };
  t.truthy(reply.devname, out);
  t.is(stats.devices, 1);
  t.false(fs.existsSync(socket), 'the socket file is removed');
  t.deepEqual(fs.readdirSync(nodes), [], 'the node the server made is removed');
  t.deepEqual(mountsUnder(nodes), [], 'and unmounted');
  t.deepEqual(await boundAfterSettling(img.path), []);
});

loopTest('the TS declaration of the addon (Native in ts/binding.ts) lists exactly what the addon exports', (t) => {
  // Parsed from the source: a drift between the hand-written interface and lib.rs's export table fails here.
  const source = fs.readFileSync(path.resolve('ts/binding.ts'), 'utf8');
  const body = /export interface Native \{([\s\S]*?)\n\}/.exec(source)?.[1] ?? '';
  const declared = [...body.matchAll(/^ {2}(\w+)\(/gm)].map((m) => m[1]!).sort();
  const exported = Object.keys(native).filter((k) => typeof (native as unknown as Record<string, unknown>)[k] === 'function');
  t.true(declared.length > 30, `${declared.length} methods declared`);
  t.deepEqual(exported.sort(), declared);
});
