/**
 * Remote loop (osbuild remoteloop wire format): our server and client against each other, across
 * processes and uids, and against a Python peer that speaks like osbuild's own LoopClient / LoopServer.
 */
import type { ExecutionContext } from 'ava';
import { execFileSync, spawn, spawnSync, type SpawnOptions } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { LoopClient, LoopServer, RemoteDevice, RemoteLoopError, removeNode } from '../ts/index.js';
import { boundAfterSettling, devicesBoundUnder, image, jsonLines, loopTest, nodeDev, sysfs, until, type Json } from './helpers.js';
import { CLI, LOCKED_PIPE, partitionImage, REMOTE_SERVE as SERVE, ROOT } from './fixtures.js';

const FIXTURES = fileURLToPath(new URL('./fixtures/', import.meta.url));
// osbuild's client and server in Python, passed inline (python3 -c): a child running as another uid then
// needs no access to this checkout (a CI clone in a 0700 directory).
const PEER = ['-c', fs.readFileSync(path.join(FIXTURES, 'osbuild_remoteloop.py'), 'utf8')];

function exited(child: { exitCode: number | null; once: (e: 'exit', f: () => void) => void }): Promise<void> {
  return child.exitCode !== null ? Promise.resolve() : new Promise((resolve) => child.once('exit', () => resolve()));
}

/** Runs the Python peer to completion and returns its JSON lines. */
async function runPeer(args: string[], options: SpawnOptions = {}): Promise<Json[]> {
  const child = spawn('python3', [...PEER, ...args], { stdio: ['ignore', 'pipe', 'inherit'], ...options });
  const out: Json[] = [];
  for await (const line of createInterface({ input: child.stdout! })) out.push(JSON.parse(line) as Json);
  await exited(child);
  return out;
}

/** A started LoopServer on `<dir>/remoteloop`, closed at teardown (before the temp dir is checked). */
async function server(t: ExecutionContext, dir: string, allowUids?: number[]): Promise<LoopServer> {
  const s = new LoopServer({ socketPath: path.join(dir, 'remoteloop'), ...(allowUids ? { allowUids } : {}) });
  await s.listen();
  t.teardown(() => s.close());
  return s;
}

/** Removes a node a server made in `dir`, whoever made it (bind mount or mknod); fine if already gone. */
function dropNode(dir: string, devname: string): void {
  const dirFd = fs.openSync(dir, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
  try {
    removeNode(dirFd, devname);
  } catch (e) {
    if ((e as { code?: string }).code !== 'ENOENT') throw e;
  } finally {
    fs.closeSync(dirFd);
  }
}

/** N of `loopN`, or of a non-root peer's `loopN.d/loopN`. */
function minorOf(devname: string): number {
  return Number(path.basename(devname).slice('loop'.length));
}

/** The loop minor a node in a directory reaches (rdev 7:minor), whether a bind mount or a mknod node. */
function nodeMinor(p: string): number {
  const { major, minor, block } = nodeDev(p);
  if (!block || major !== 7) throw new Error(`${p} is not a loop device node`);
  return minor;
}

/** Polls `ok` every 5 ms; throws after `timeoutMs`. */
/**
 * Holds flock(LOCK_EX) on /dev/loop-control, which loopForFd takes, until `release()` (or teardown, or
 * this process dying: the holder exits when its stdin closes). Tests using it are serial: while the lock
 * is held, nothing in this process may wait on a loop device allocation.
 */
async function holdLoopControlLock(t: ExecutionContext): Promise<{ release: () => Promise<void> }> {
  const locker = spawn('flock', ['-w', '30', '/dev/loop-control', '-c', 'echo locked; read x'], {
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  t.teardown(() => {
    if (locker.exitCode === null) locker.kill();
  });
  const next = createInterface({ input: locker.stdout })[Symbol.asyncIterator]();
  const first = await next.next();
  if (first.value !== 'locked') throw new Error(`flock said ${String(first.value)}`);
  return {
    release: async () => {
      locker.stdin.end('\n');
      await exited(locker);
    },
  };
}

loopTest('round trip in one process: the device has the options asked for, freed when the connection closes', async (t) => {
  const img = image(t);
  const srv = await server(t, img.dir);
  using client = new LoopClient(srv.socketPath);
  const dev = await client.device(img.path, {
    devDir: img.dir,
    offset: 4096,
    sizeLimit: 1 << 20,
    readOnly: true,
    sectorSize: 4096,
    lock: true,
  });
  t.teardown(() => dev.removeSync());
  t.true(dev instanceof RemoteDevice);
  t.regex(dev.devname, /^loop\d+$/);
  t.is(dev.path, path.join(img.dir, dev.devname));
  const minor = minorOf(dev.devname);
  t.is(nodeMinor(dev.path), minor, 'the node in devDir reaches the device the server named');
  t.is(sysfs(minor, 'loop/backing_file'), img.path);
  t.is(sysfs(minor, 'loop/offset'), '4096');
  t.is(sysfs(minor, 'loop/sizelimit'), String(1 << 20));
  t.is(sysfs(minor, 'loop/autoclear'), '1', 'the server always asks for autoclear');
  t.is(sysfs(minor, 'ro'), '1');
  t.is(sysfs(minor, 'queue/logical_block_size'), '4096');
  t.like(srv.stats(), { running: true, connections: 1, devices: 1, requests: 1, failures: 0 });

  await dev[Symbol.asyncDispose]();
  t.false(fs.existsSync(dev.path), 'disposing the RemoteDevice removes the node');
  t.true(dev.removed);
  t.deepEqual(devicesBoundUnder(img.dir), [`/dev/${dev.devname}`], 'the server holds it while we are connected');

  client.close();
  t.deepEqual(await boundAfterSettling(img.dir), [], 'the device goes with our connection');
  await until('the server to count it released', () => srv.stats().devices === 0);
  t.like(srv.stats(), { connections: 0, devices: 0 });
  await srv.close();
  t.false(fs.existsSync(srv.socketPath), 'the socket file is removed');
  await srv.close(); // idempotent
});

loopTest('a refused request is a RemoteLoopError and the connection keeps serving', async (t) => {
  const img = image(t);
  const srv = await server(t, img.dir);
  using client = new LoopClient(srv.socketPath);
  const err = await t.throwsAsync(client.device('/dev/null', { devDir: img.dir }), { instanceOf: RemoteLoopError });
  t.is(err.code, 'EINVAL');
  t.is(err.errno, -22);
  t.is(err.remoteType, 'OSError');
  t.regex(err.remoteValue, /^\[Errno 22\] EINVAL: .*not a regular file or block device/);
  t.is(err.path, srv.socketPath);
  // Refused as attach() refuses it, not bound as an empty device (osbuild's server binds it).
  const past = await t.throwsAsync(client.device(img.path, { devDir: img.dir, offset: fs.statSync(img.path).size }), {
    instanceOf: RemoteLoopError,
  });
  t.is(past.code, 'EINVAL');
  t.regex(past.remoteValue, /at or beyond the end of the backing file/);
  t.deepEqual(devicesBoundUnder(img.dir), []);

  // An open fd works too, and stays the caller's.
  await using dev = await client.device(img.fd, { devDir: img.dir });
  t.is(sysfs(minorOf(dev.devname), 'loop/backing_file'), img.path);
  t.true(fs.fstatSync(img.fd).isFile(), "the caller's fd is still open");
  t.like(srv.stats(), { requests: 3, failures: 2, devices: 1 });
  client.close();
  t.throws(() => client.device(img.path), { code: 'ERR_LOOP_CLOSED' });
});

loopTest('closing the server frees every device it attached', async (t) => {
  const images = [image(t), image(t), image(t)];
  const srv = await server(t, images[0]!.dir);
  using client = new LoopClient(srv.socketPath);
  const devs: RemoteDevice[] = [];
  for (const img of images) {
    const dev = await client.device(img.path, { devDir: images[0]!.dir });
    t.teardown(() => dev.removeSync());
    devs.push(dev);
  }
  t.is(new Set(devs.map((d) => d.devname)).size, 3);
  for (const img of images) t.is(devicesBoundUnder(img.dir).length, 1);
  t.is(srv.stats().devices, 3);
  await srv.close();
  for (const img of images) t.deepEqual(await boundAfterSettling(img.dir), [], `${img.path} is free`);
});

// A hung-up client's devices are released by a worker while the poll thread goes on: close() must wait for
// that work too, not only for the connections still open when it was called.
loopTest('closing the server waits for the devices of a client that hung up just before', async (t) => {
  const img = image(t);
  const srv = await server(t, img.dir);
  const client = new LoopClient(srv.socketPath);
  const names = new Set<string>();
  for (let i = 0; i < 60; i++) {
    // Nodes left for the server to remove make the release take longer, so the race is seen more often.
    const dev = await client.device(img.path, { devDir: img.dir });
    names.add(`/dev/${dev.devname}`);
  }
  client.close();
  // Spin rather than poll on a timer: close() must start while the worker is still releasing the devices.
  const deadline = Date.now() + 5000;
  while (srv.stats().connections > 0) if (Date.now() > deadline) throw new Error('the server missed the hang-up');
  await srv.close();
  const ours = fs.readdirSync('/proc/self/fd').filter((fd) => {
    try {
      return names.has(fs.readlinkSync(`/proc/self/fd/${fd}`));
    } catch {
      return false; // closed meanwhile
    }
  });
  t.deepEqual(ours, [], 'no fd of those devices is open once close() has resolved');
  t.deepEqual(await boundAfterSettling(img.dir), []);
});

loopTest.serial('loopdev serve under socket activation (systemd-socket-activate): one log line per request', async (t) => {
  const img = image(t);
  const socketPath = path.join(img.dir, 'remoteloop');
  const serve = (quiet: boolean) => {
    const argv = ['--seqpacket', '-l', socketPath, process.execPath, '--import=tsx', CLI, 'serve', ...(quiet ? ['-q'] : [])];
    const child = spawn('systemd-socket-activate', argv, { cwd: ROOT, stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    t.teardown(() => {
      if (child.exitCode === null) child.kill('SIGKILL');
    });
    return { child, stderr: () => stderr };
  };
  for (const quiet of [false, true]) {
    const server = serve(quiet);
    while (!server.stderr().includes('Listening on')) await new Promise((r) => setTimeout(r, 10));
    {
      // The first connection starts the server, which finds the socket as fd 3 (LISTEN_FDS=1).
      using client = new LoopClient(socketPath);
      const dev = await client.device(img.path, { devDir: img.dir });
      t.is(sysfs(minorOf(dev.devname), 'loop/backing_file'), img.path);
      await t.throwsAsync(client.device('/dev/null', { devDir: img.dir }), { code: 'EINVAL' });
      await dev.remove();
      // A name with a newline must not add a line of its own to the log (red team round 18).
      const forged = path.join(img.dir, 'x\nloopdev serve: forged.img');
      fs.linkSync(img.path, forged);
      await (await client.device(forged, { devDir: img.dir })).remove();
      fs.rmSync(forged);
    }
    t.is(listenerCopies(server.child.pid!, socketPath), 1, 'the server serves on its duplicate: fd 3 is closed');
    server.child.kill('SIGTERM');
    await exited(server.child);
    t.is(server.child.exitCode, 0, server.stderr());
    const lines = server.stderr().split('\n').filter((l) => l.includes(`pid ${process.pid} uid 0:`));
    if (quiet) {
      t.deepEqual(lines, [], '--quiet: no request lines');
    } else {
      t.is(lines.length, 3, server.stderr());
      t.regex(lines[0]!, new RegExp(`^loopdev serve: pid ${process.pid} uid 0: ${img.path} -> loop\\d+ \\(\\d+\\.\\d ms\\)$`));
      t.regex(lines[1]!, /: \/dev\/null -> refused: EINVAL: /);
      t.true(lines[2]!.includes('/x\\nloopdev serve: forged.img -> loop'), lines[2]);
      t.false(server.stderr().includes('\nloopdev serve: forged'), 'no line of the name\'s making');
    }
    t.true(fs.existsSync(socketPath), "the socket is its activator's: left in place");
    fs.rmSync(socketPath);
    t.deepEqual(await boundAfterSettling(img.path), []);
  }
});

loopTest('across processes: a serve() child serves our client and releases its devices on SIGTERM', async (t) => {
  const img = image(t);
  const socketPath = path.join(img.dir, 'remoteloop');
  const child = spawn(process.execPath, ['--import=tsx', SERVE, socketPath], { stdio: ['ignore', 'pipe', 'inherit'] });
  t.teardown(() => {
    if (child.exitCode === null) child.kill('SIGKILL');
  });
  const next = jsonLines(child);
  t.like(await next(), { event: 'ready' });
  {
    using client = new LoopClient(socketPath);
    await using dev = await client.device(img.path, { devDir: img.dir, partscan: true });
    t.is(nodeMinor(dev.path), minorOf(dev.devname));
    t.is(sysfs(minorOf(dev.devname), 'loop/partscan'), '1');
  }
  t.deepEqual(await boundAfterSettling(img.dir), [], 'the child released the device with our connection');
  using client = new LoopClient(socketPath);
  await client.device(img.path, { devDir: img.dir });
  t.is(devicesBoundUnder(img.dir).length, 1, 'a device held for a connection that is still open…');
  child.kill('SIGTERM');
  t.like(await next(), { event: 'stopped', why: 'SIGTERM' });
  await exited(child);
  t.is(child.exitCode, 0);
  t.false(fs.existsSync(socketPath));
  t.deepEqual(await boundAfterSettling(img.dir), []);
  t.deepEqual(fs.readdirSync(img.dir), ['disk.img'], '…and its node go when the server stops');
});

/** How many fds of process `pid` are the socket listening at `socketPath` (its inode from /proc/net/unix). */
function listenerCopies(pid: number, socketPath: string): number {
  // Num RefCount Protocol Flags Type St Inode Path; Flags 00010000 is a listening socket.
  const row = fs
    .readFileSync('/proc/net/unix', 'utf8')
    .split('\n')
    .map((line) => line.trim().split(/\s+/))
    .find((f) => f[3] === '00010000' && f[7] === socketPath);
  const link = `socket:[${row?.[6] ?? 'none'}]`;
  return fs.readdirSync(`/proc/${pid}/fd`).filter((fd) => {
    try {
      return fs.readlinkSync(`/proc/${pid}/fd/${fd}`) === link;
    } catch {
      return false; // closed meanwhile
    }
  }).length;
}

/** The dir and socket reachable by another uid, so only SO_PEERCRED stands in its way. */
function openToOthers(dir: string, socketPath: string): void {
  fs.chmodSync(dir, 0o711);
  fs.chmodSync(socketPath, 0o666);
}

/** osbuild's client as uid 65534 asks `socketPath` for a device of `img` with its node in `img.dir` (root's). */
async function askAsNobody(t: ExecutionContext, socketPath: string, img: { dir: string; fd: number }): Promise<Json> {
  openToOthers(img.dir, socketPath);
  const dirFd = fs.openSync(img.dir, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
  t.teardown(() => fs.closeSync(dirFd));
  const [result] = await runPeer(['client', socketPath, '--fd', '3', '--dir-fd', '4', '--dev-dir', img.dir], {
    uid: 65534,
    gid: 65534,
    stdio: ['ignore', 'pipe', 'inherit', img.fd, dirFd],
  });
  return result!;
}

loopTest('a peer whose uid is not allowed is refused (child running as uid 65534)', async (t) => {
  const img = image(t);
  const srv = await server(t, img.dir);
  const result = await askAsNobody(t, srv.socketPath, img);
  t.false(result.ok, JSON.stringify(result));
  t.regex(result.error, /^OSError: \[Errno 1\] EPERM: uid 65534 is not allowed to use this loop server/);
  t.like(srv.stats(), { refused: 1, devices: 0, connections: 0 });
  t.deepEqual(devicesBoundUnder(img.dir), []);
  t.deepEqual(fs.readdirSync(img.dir).sort(), ['disk.img', 'remoteloop']);
});

/** A directory inside `dir` owned by uid/gid 65534: where a non-root peer may have its nodes made. */
function peerDir(dir: string): string {
  const own = path.join(dir, 'peer-dev');
  fs.mkdirSync(own, { mode: 0o755 });
  fs.chownSync(own, 65534, 65534);
  return own;
}

// Serial: it runs the server under umask 077 (a common hardening of services), which is the process's.
loopTest.serial('a uid in allowUids gets a device in its own directory, released when it hangs up (uid 65534)', async (t) => {
  const umask = process.umask(0o077);
  t.teardown(() => process.umask(umask));
  const img = image(t);
  const srv = await server(t, img.dir, [0, 65534]);
  openToOthers(img.dir, srv.socketPath);
  const devDir = peerDir(img.dir);
  fs.chmodSync(devDir, 0o2755); // setgid, as a group's shared directory: the server's directory inherits it
  const dirFd = fs.openSync(devDir, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
  t.teardown(() => fs.closeSync(dirFd));
  const child = spawn('python3', [...PEER, 'client', srv.socketPath, '--fd', '3', '--dir-fd', '4', '--dev-dir', devDir, '--hold'], {
    uid: 65534,
    gid: 65534,
    stdio: ['pipe', 'pipe', 'inherit', img.fd, dirFd],
  });
  t.teardown(() => {
    if (child.exitCode === null) child.kill('SIGKILL');
  });
  const next = jsonLines(child);
  const result = await next();
  t.true(result.ok, JSON.stringify(result));
  t.true(result.isBlock);
  t.regex(result.devname, /^loop(\d+)\.d\/loop\1$/, "the node is in a directory of root's, which the peer cannot empty");
  t.like(fs.statSync(path.dirname(result.path)), { uid: 0, mode: fs.constants.S_IFDIR | 0o2000 | 0o755 }, 'whatever the umask');
  t.is(sysfs(minorOf(result.devname), 'loop/backing_file'), img.path);
  t.like(srv.stats(), { refused: 0, devices: 1, connections: 1 });
  child.stdin!.end('\n');
  const unlinked = await next();
  t.false(unlinked.unlinked, "a node in root's directory cannot be unlinked by its peer");
  await exited(child);
  await until('the server to release the device of the closed connection', () => srv.stats().devices === 0);
  t.deepEqual(fs.readdirSync(devDir), [], 'the server removed the node');
  t.deepEqual(await boundAfterSettling(img.dir), []);
});

loopTest("a non-root peer cannot have a node made in a directory it does not own (uid 65534)", async (t) => {
  const img = image(t);
  const srv = await server(t, img.dir, [0, 65534]);
  const result = await askAsNobody(t, srv.socketPath, img);
  t.false(result.ok, JSON.stringify(result));
  t.regex(result.error, /\[Errno 13\] EACCES: 'dir_fd' must be a directory owned by uid 65534/);
  t.deepEqual(fs.readdirSync(img.dir).sort(), ['disk.img', 'remoteloop'], 'nothing was created there');
  t.deepEqual(devicesBoundUnder(img.dir), []);
});

loopTest("our server with osbuild's LoopClient (Python): exact request bytes, device, errors", async (t) => {
  const img = image(t);
  const srv = await server(t, img.dir);
  const base = ['client', srv.socketPath, '--file', img.path, '--dev-dir', img.dir];
  const holder = spawn('python3', [...PEER, ...base, '--offset', '512', '--sizelimit', '1048576', '--read-only', '--hold'], {
    stdio: ['pipe', 'pipe', 'inherit'],
  });
  t.teardown(() => {
    if (holder.exitCode === null) holder.kill('SIGKILL');
  });
  const next = jsonLines(holder);
  const ok = await next();
  t.true(ok!.ok, JSON.stringify(ok));
  t.is(
    ok!.request,
    '{"fd": 0, "dir_fd": 1, "offset": 512, "sizelimit": 1048576, "lock": false, "partscan": false, ' +
      '"read_only": true, "sector_size": 512}',
  );
  t.true(ok!.isBlock);
  const minor = minorOf(ok!.devname);
  t.is(sysfs(minor, 'loop/offset'), '512');
  t.is(sysfs(minor, 'loop/sizelimit'), '1048576');
  t.is(sysfs(minor, 'ro'), '1');
  holder.stdin!.end('\n');
  // osbuild's client only unlinks; our server bind-mounted the host node, which cannot be unlinked in the
  // same mount namespace. Either way the server removes the node when the connection closes.
  const unlinked = await next();
  t.true(unlinked!.unlinked === true || unlinked!.errno === 'EBUSY', JSON.stringify(unlinked));
  await exited(holder);
  await until('the device of the closed connection to be released', () => srv.stats().devices === 0);
  t.false(fs.existsSync(path.join(img.dir, ok!.devname)), 'the node went with the connection');

  const [refused] = await runPeer(['client', srv.socketPath, '--file', '/dev/null', '--dev-dir', img.dir]);
  t.false(refused!.ok);
  t.regex(refused!.error, /^OSError: \[Errno 22\] EINVAL: /);
  t.like(refused!.reply, { method: 'exception', exception: { type: 'OSError' } });
  t.deepEqual(Object.keys(refused!.reply), ['method', 'exception']);
  t.deepEqual(Object.keys(refused!.reply.exception), ['type', 'value', 'traceback']);
  t.like(srv.stats(), { requests: 2, failures: 1, devices: 0 });
});

loopTest.serial('a request in the <args-via-fd> memfd form, with lock: the device is flock()ed while held', async (t) => {
  const img = image(t);
  const srv = await server(t, img.dir);
  const args = ['client', srv.socketPath, '--file', img.path, '--dev-dir', img.dir, '--via-fd', '--lock', '--hold'];
  const holder = spawn('python3', [...PEER, ...args], { stdio: ['pipe', 'pipe', 'inherit'] });
  t.teardown(() => {
    if (holder.exitCode === null) holder.kill('SIGKILL');
  });
  const next = jsonLines(holder);
  const ok = await next();
  t.true(ok!.ok, JSON.stringify(ok));
  t.regex(ok!.request, /"lock": true/);
  const minor = minorOf(ok!.devname);
  t.is(sysfs(minor, 'loop/backing_file'), img.path);
  // The server holds LOCK_EX on /dev/loopN (what udev and systemd take LOCK_SH on before probing).
  const probe = spawnSync('flock', ['--nonblock', '--shared', `/dev/${ok!.devname}`, 'true']);
  t.is(probe.status, 1, 'a second opener cannot take the lock while the client holds the device');
  holder.stdin!.end('\n');
  await next();
  await exited(holder);
  await until('the device of the closed connection to be released', () => srv.stats().devices === 0);
  t.deepEqual(await boundAfterSettling(img.path), []);
});

loopTest("our LoopClient with osbuild's LoopServer (Python): request, device, exception, release", async (t) => {
  const img = image(t);
  const socketPath = path.join(img.dir, 'remoteloop');
  const peer = spawn('python3', [...PEER, 'server', socketPath], { stdio: ['ignore', 'pipe', 'inherit'] });
  t.teardown(() => {
    if (peer.exitCode === null) peer.kill('SIGKILL');
  });
  const next = jsonLines(peer);
  t.like(await next(), { event: 'ready' });
  using client = new LoopClient(socketPath);

  const dev = await client.device(img.path, { devDir: img.dir, offset: 8192, sectorSize: 4096, partscan: true });
  t.teardown(() => dev.removeSync());
  const request = await next();
  t.is(request.fds, 2);
  t.is(
    request.raw,
    '{"fd": 0, "dir_fd": 1, "offset": 8192, "lock": false, "partscan": true, "read_only": false, "sector_size": 4096}',
    "byte for byte what osbuild's client sends (json.dumps)",
  );
  t.like(await next(), { event: 'device', devname: dev.devname });
  const minor = minorOf(dev.devname);
  t.is(nodeMinor(dev.path), minor);
  t.is(sysfs(minor, 'loop/offset'), '8192');
  t.is(sysfs(minor, 'queue/logical_block_size'), '4096');
  t.is(sysfs(minor, 'loop/autoclear'), '1');
  await dev.remove();
  t.false(fs.existsSync(dev.path));

  // /proc is no place for a node: osbuild's server raises, and says so in its exception message.
  const err = await t.throwsAsync(client.device(img.path, { devDir: '/proc' }), { instanceOf: RemoteLoopError });
  t.like(await next(), { event: 'request' });
  const raised = await next();
  t.is(raised.event, 'exception');
  t.is(err.remoteType, raised.type);
  t.is(err.remoteValue, raised.value);
  t.regex(err.message, /loop server '.*remoteloop': \w+Error: /);

  peer.kill('SIGTERM');
  t.like(await next(), { event: 'closed', devices: 1 });
  await exited(peer);
  t.deepEqual(await boundAfterSettling(img.dir), [], "osbuild's server releases what it pinned on exit");
});

// Serial (AVA runs these first, one at a time): blocking this thread, or holding the loop-control lock,
// while another test of this file waits for a device would deadlock the two.
loopTest.serial('the server does not need the event loop: a client is served while JS is blocked', async (t) => {
  const img = image(t);
  const srv = await server(t, img.dir);
  // execFileSync blocks this thread until the Python client is done: only the server thread can answer it.
  const out = execFileSync('python3', [...PEER, 'client', srv.socketPath, '--file', img.path, '--dev-dir', img.dir], {
    encoding: 'utf8',
  });
  const [result] = out.trim().split('\n').map((l) => JSON.parse(l) as Json);
  t.true(result!.ok, out);
  dropNode(img.dir, result!.devname);
  await until('the device of the finished client to be released', () => srv.stats().devices === 0);
  t.deepEqual(await boundAfterSettling(img.dir), []);
});

loopTest.serial('a configure waiting on the kernel does not stall JS', async (t) => {
  const img = image(t);
  const srv = await server(t, img.dir);
  using client = new LoopClient(srv.socketPath);
  const lock = await holdLoopControlLock(t);
  let settled = false;
  let pending: Promise<RemoteDevice>;
  try {
    pending = client.device(img.path, { devDir: img.dir });
    void pending.finally(() => (settled = true)).catch(() => {});
    let ticks = 0;
    await until('the request to reach the server', () => ++ticks >= 20 && srv.stats().requests === 1);
    t.false(settled, 'the server thread is still waiting for the loop-control lock');
    t.true(ticks >= 20, 'timers kept running meanwhile');
  } finally {
    await lock.release();
  }
  await using dev = await pending;
  t.is(nodeMinor(dev.path), minorOf(dev.devname));
});

loopTest.serial('a client that hangs up before its reply leaks nothing', async (t) => {
  const img = image(t);
  const srv = await server(t, img.dir);
  const lock = await holdLoopControlLock(t);
  try {
    // The Python client sends a valid request and exits without reading; the server is stuck on the lock.
    const child = spawn('python3', ['-c', HANG_UP, srv.socketPath, img.path, img.dir], { stdio: 'inherit' });
    await exited(child);
    t.is(child.exitCode, 0);
    await until('the request to reach the server', () => srv.stats().requests === 1);
  } finally {
    await lock.release();
  }
  // The server sees the hang-up; its worker attaches and makes the node, and with no one to tell, undoes both.
  await until('the server to drop the connection and release the device', () => {
    const { connections, devices } = srv.stats();
    return connections === 0 && devices === 0;
  });
  t.like(srv.stats(), { requests: 1 });
  t.deepEqual(fs.readdirSync(img.dir).sort(), ['disk.img', 'remoteloop'], 'no node left behind');
  t.deepEqual(await boundAfterSettling(img.dir), [], 'no device left bound');
});

const HANG_UP = `
import array, os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.bind("")
s.connect(sys.argv[1])
fds = [os.open(sys.argv[2], os.O_RDWR), os.open(sys.argv[3], os.O_DIRECTORY)]
req = b'{"fd": 0, "dir_fd": 1, "lock": false, "partscan": false, "read_only": false, "sector_size": 512}'
s.sendmsg([req], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
`;

loopTest('partscan through the server: the partitions appear (registered where the kernel parses no table)', async (t) => {
  const img = image(t);
  partitionImage(img.path);
  const srv = await server(t, img.dir);
  {
    using client = new LoopClient(srv.socketPath);
    const dev = await client.device(img.path, { devDir: img.dir, partscan: true });
    const minor = minorOf(dev.devname);
    t.is(sysfs(minor, `${dev.devname}p1/start`), '2048');
    t.is(sysfs(minor, `${dev.devname}p2/start`), '4096');
    await dev.remove();
  }
  await until('the device of the closed connection to be released', () => srv.stats().devices === 0);
  t.deepEqual(await boundAfterSettling(img.path), []);
});

loopTest('open: true gets an fd of the device with the reply; remove() closes it', async (t) => {
  const img = image(t);
  fs.writeFileSync(img.path, 'first bytes');
  fs.truncateSync(img.path, 8 << 20);
  const srv = await server(t, img.dir);
  using client = new LoopClient(srv.socketPath);
  const dev = await client.device(img.path, { devDir: img.dir, open: true, readOnly: true });
  t.true(dev.fd >= 0);
  const buf = Buffer.alloc(11);
  t.is(fs.readSync(dev.fd, buf, 0, 11, 0), 11);
  t.is(buf.toString(), 'first bytes');
  t.throws(() => fs.writeSync(dev.fd, 'x', 0), { code: 'EBADF' }, 'read-only binding: an O_RDONLY fd');
  await dev.remove();
  t.is(dev.fd, -1);
  const plain = await client.device(img.path, { devDir: img.dir });
  t.is(plain.fd, -1, 'no fd unless asked for');
  await plain.remove();
});

loopTest("the client's default devDir /dev against a server in this mount namespace: EEXIST with a hint", async (t) => {
  const img = image(t);
  const srv = await server(t, img.dir);
  using client = new LoopClient(srv.socketPath);
  const err = await t.throwsAsync(client.device(img.path), { instanceOf: RemoteLoopError, code: 'EEXIST' });
  t.regex(err!.message, /a server in this mount namespace sees the host's \/dev; pass a directory of your own as devDir\)$/);
  t.deepEqual(await boundAfterSettling(img.path), [], 'nothing bound for the failed request');
});

loopTest('LoopServer: listen errors, double listen, close before listen', async (t) => {
  const img = image(t);
  const taken = path.join(img.dir, 'taken');
  fs.writeFileSync(taken, 'x');
  const s = new LoopServer({ socketPath: taken });
  const inUse = await t.throwsAsync(s.listen(), { code: 'EADDRINUSE' });
  t.like(inUse, { syscall: 'bind', path: taken });
  t.is(fs.readFileSync(taken, 'utf8'), 'x', 'an existing file is left alone');
  await s.close();

  const srv = await server(t, img.dir);
  await t.throwsAsync(srv.listen(), { code: 'ERR_SERVER_ALREADY_LISTEN' });
  t.true(srv.listening);
  await srv.close();
  t.false(srv.listening);
  await t.throwsAsync(srv.listen(), { code: 'ERR_LOOP_CLOSED' });
  t.throws(() => srv.stats(), { code: 'ERR_LOOP_CLOSED' });
  t.like(t.throws(() => new LoopClient(srv.socketPath), { code: 'ENOENT' }), { syscall: 'connect' });
  t.throws(() => new LoopServer({ socketPath: '' }), { instanceOf: TypeError });
  await new LoopServer({ socketPath: path.join(img.dir, 'never') }).close();
  // One worker is always left to root: with a single one, no other peer could ever be served (round 20).
  const single = new LoopServer({ socketPath: path.join(img.dir, 'single'), workers: 1 });
  await t.throwsAsync(single.listen(), { instanceOf: RangeError, message: /^The value of "workers" is out of range. It must be an integer >= 2 / });
  t.false(fs.existsSync(single.socketPath));
});

// A server killed while one of its closes is stuck in the kernel (a pipe whose lock another process holds)
// cannot finish exiting: its fd table, listening socket included, lives on, and connecting still succeeds
// (red team round 8, x1). Here a Python process plays that server; its parent holds the pipe's lock.
const STUCK_LISTENER = String.raw`
import os, socket, sys, threading, time
${LOCKED_PIPE}
path = sys.argv[1]
r, w, _ = locked_pipe()
go_r, go_w = os.pipe()
pid = os.fork()
if pid == 0:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(8)
    os.read(go_r, 1)  # the parent closed its copy: ours is the last reference to the write end
    threading.Thread(target=os.close, args=(w,), daemon=True).start()
    time.sleep(3600)
os.close(w)
os.write(go_w, b"g")
time.sleep(0.3)
print(pid, flush=True)
sys.stdin.readline()
`;

loopTest('a socket whose server was killed but cannot finish exiting is replaced on restart', async (t) => {
  const img = image(t);
  const socketPath = path.join(img.dir, 'remoteloop');
  const holder = spawn('python3', ['-c', STUCK_LISTENER, socketPath], { stdio: ['pipe', 'pipe', 'inherit'] });
  t.teardown(() => holder.kill('SIGKILL'));
  const pid = Number(await new Promise<string>((resolve) => createInterface({ input: holder.stdout! }).once('line', resolve)));
  const live = new LoopServer({ socketPath });
  await t.throwsAsync(live.listen(), { code: 'EADDRINUSE', message: /listening on it already/ }, 'not killed yet: live');
  await live.close();
  process.kill(pid, 'SIGKILL');
  await new Promise((resolve) => setTimeout(resolve, 200));
  t.regex(fs.readFileSync(`/proc/${pid}/status`, 'utf8'), /State:\s+Z/, 'killed, and stuck exiting (else this proves nothing)');
  const srv = await server(t, img.dir);
  using client = new LoopClient(srv.socketPath);
  const dev = await client.device(img.path, { devDir: img.dir });
  t.is(sysfs(Number(dev.devname.slice(4)), 'loop/backing_file'), img.path);
  await dev.remove();
  holder.stdin!.end(); // lets go of the pipe: the stuck close returns and the killed process is gone
  await srv.close();
});

// A listener whose queue is full (anyone who can connect can fill it) must not keep a starting server
// waiting in connect (red team round 11, x2): EADDRINUSE at once.
loopTest('a socket whose listener never accepts and has a full queue is refused at once, not waited on', async (t) => {
  const img = image(t);
  const socketPath = path.join(img.dir, 'remoteloop');
  const FULL = String.raw`
import socket, sys
path = sys.argv[1]
listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
listener.bind(path)
listener.listen(1)
queued = []
for _ in range(8):
    c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    c.setblocking(False)
    try:
        c.connect(path)
        queued.append(c)
    except BlockingIOError:
        break
print(len(queued), flush=True)
sys.stdin.readline()
`;
  const holder = spawn('python3', ['-c', FULL, socketPath], { stdio: ['pipe', 'pipe', 'inherit'] });
  t.teardown(() => holder.kill('SIGKILL'));
  const queued = Number(await new Promise<string>((resolve) => createInterface({ input: holder.stdout! }).once('line', resolve)));
  t.true(queued >= 1, 'the queue is full (else this proves nothing)');
  const start = performance.now();
  const s = new LoopServer({ socketPath });
  await t.throwsAsync(s.listen(), { code: 'EADDRINUSE', message: /queue is full/ });
  t.true(performance.now() - start < 1000, `refused in ${Math.round(performance.now() - start)} ms`);
  await s.close();
  holder.stdin!.end();
});
