/**
 * The remote client against servers that stall: requests never borrow a libuv pool thread, give up at
 * their deadline or on abort, leave no fd behind, and a reply that arrives after its request was given up
 * on is discarded. The servers are small Python fakes (a real server cannot be made to stall on demand).
 */
import type { ExecutionContext } from 'ava';
import { spawn } from 'node:child_process';
import * as dns from 'node:dns';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { createInterface } from 'node:readline';
import { LoopClient } from '../ts/index.js';
import { loopTest, tempDir } from './helpers.js';

/** A SOCK_SEQPACKET server: `silent` reads requests and never answers; `late` answers each after DELAY s;
 * `named` answers at once with the devnames of NAMES (a JSON list), one per request. */
const FAKE_SERVER = String.raw`
import json, os, select, socket, sys, time
path, mode, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
names = json.loads(sys.argv[4]) if len(sys.argv) > 4 else []
srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
srv.bind(path)
srv.listen(64)
print("ready", flush=True)
conns, due, seen = [], [], 0
while True:
    timeout = max(0, min(t for t, _, _ in due) - time.time()) if due else None
    r, _, _ = select.select([srv] + conns, [], [], timeout)
    for s in r:
        if s is srv:
            conns.append(srv.accept()[0])
            continue
        msg, fds, _, _ = socket.recv_fds(s, 4096, 8)
        for fd in fds:
            os.close(fd)
        if not msg:
            conns.remove(s)
            continue
        seen += 1
        print(json.dumps({"request": seen}), flush=True)
        if mode == "late":
            due.append((time.time() + delay, s, seen))
        if mode == "named":
            s.send(json.dumps({"devname": names[seen - 1]}).encode())
    now = time.time()
    for item in [d for d in due if d[0] <= now]:
        due.remove(item)
        item[1].send(json.dumps({"devname": "loop%d" % (100000 + item[2])}).encode())
`;

async function fakeServer(t: ExecutionContext, mode: 'silent' | 'late' | 'named', delaySeconds = 0, names: string[] = []) {
  const socketPath = path.join(tempDir(t), 'remoteloop');
  const child = spawn('python3', ['-c', FAKE_SERVER, socketPath, mode, String(delaySeconds), JSON.stringify(names)], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  t.teardown(() => {
    child.kill('SIGKILL');
  });
  const lines = createInterface({ input: child.stdout! })[Symbol.asyncIterator]();
  const next = async (): Promise<string> => (await lines.next()).value as string;
  t.is(await next(), 'ready');
  let requests = 0;
  void (async () => {
    for (;;) {
      const line = await next();
      if (line === undefined) return;
      requests = (JSON.parse(line) as { request: number }).request;
    }
  })();
  return { socketPath, requests: () => requests };
}

function openFds(): number {
  return fs.readdirSync('/proc/self/fd').length;
}

/** Threads of ours waiting for a server's replies (one per client, named `loopdev.remoteRequest`). */
function requestThreads(): number {
  const named = (task: string) => {
    try {
      return fs.readFileSync(`/proc/self/task/${task}/comm`, 'utf8').startsWith('loopdev.remoteR');
    } catch {
      return false; // the thread ended meanwhile
    }
  };
  return fs.readdirSync('/proc/self/task').filter(named).length;
}

/** Closed clients' request threads end once their last request is done: poll for that, up to 2 s. */
async function requestThreadsSettle(): Promise<number> {
  for (let i = 0; i < 40 && requestThreads() > 0; i++) await new Promise((r) => setTimeout(r, 50));
  return requestThreads();
}

/** A fake server, a file to send it and a dir for nodes, and the fd count before any client. */
async function setUp(t: ExecutionContext, mode: 'silent' | 'late', delaySeconds = 0) {
  const dir = tempDir(t);
  const file = path.join(dir, 'file');
  fs.writeFileSync(file, 'x');
  const server = await fakeServer(t, mode, delaySeconds);
  return { dir, file, server, before: openFds() };
}

loopTest.serial('16 requests to a server that never answers take no pool thread: fs and dns go on, then ETIMEDOUT', async (t) => {
  const { dir, file, server, before } = await setUp(t, 'silent');
  const clients = Array.from({ length: 16 }, () => new LoopClient(server.socketPath));
  let settled = 0;
  const pending = clients.map((c) =>
    c.device(file, { devDir: dir, timeoutMs: 4000 }).finally(() => {
      settled++;
    }),
  );
  // libuv has 4 pool threads: with requests holding them, neither of these could complete.
  for (let i = 0; i < 8; i++) t.is(await fs.promises.readFile(file, 'utf8'), 'x');
  t.truthy(await dns.promises.lookup('localhost'));
  t.is(settled, 0, 'fs and dns completed while all 16 requests were still waiting');
  t.is(requestThreads(), 16, 'each client waits on a thread of its own');
  for (const r of await Promise.allSettled(pending)) {
    t.is(r.status, 'rejected');
    t.like((r as PromiseRejectedResult).reason, { code: 'ETIMEDOUT', syscall: 'recvmsg', path: server.socketPath });
  }
  for (const c of clients) c.close();
  t.is(openFds(), before, 'no fd left behind');
  t.is(await requestThreadsSettle(), 0, 'no request thread left behind by a closed client');
});

loopTest.serial('abort: before the call, while queued (never sent), and in flight', async (t) => {
  const { dir, file, server, before } = await setUp(t, 'silent');
  {
    using client = new LoopClient(server.socketPath);
    const early = new AbortController();
    early.abort(new Error('no longer needed'));
    const e = await t.throwsAsync(client.device(file, { devDir: dir, signal: early.signal }));
    t.like(e, { name: 'AbortError', code: 'ABORT_ERR' });
    t.is((e as Error).cause, early.signal.reason);

    const first = new AbortController();
    const second = new AbortController();
    const inFlight = client.device(file, { devDir: dir, signal: first.signal, timeoutMs: 0 });
    const queued = client.device(file, { devDir: dir, signal: second.signal, timeoutMs: 0 });
    while (server.requests() < 1) await new Promise((r) => setTimeout(r, 5));
    second.abort();
    await t.throwsAsync(queued, { code: 'ABORT_ERR' });
    first.abort();
    await t.throwsAsync(inFlight, { code: 'ABORT_ERR' });
    await new Promise((r) => setTimeout(r, 100));
    t.is(server.requests(), 1, 'the request aborted while queued never reached the server');
  }
  t.is(openFds(), before, 'no fd left behind');
});

loopTest.serial('a reply that arrives after its request gave up is discarded; the next request gets its own', async (t) => {
  const { dir, file, server, before } = await setUp(t, 'late', 0.3);
  {
    using client = new LoopClient(server.socketPath);
    await t.throwsAsync(client.device(file, { devDir: dir, timeoutMs: 50 }), { code: 'ETIMEDOUT' });
    const dev = await client.device(file, { devDir: dir, timeoutMs: 5000 });
    t.is(dev.devname, 'loop100002', "the second request's reply, not the first's");
  }
  t.is(openFds(), before, 'no fd left behind');
});

// The client opens the backing file and the node directory on the request's own thread: an error is
// fs.open's (code, syscall, path), nothing is sent, and no fd stays open.
loopTest.serial('paths the client cannot open fail like fs.open, before anything is sent', async (t) => {
  const { dir, file, server, before } = await setUp(t, 'late', 0);
  const client = new LoopClient(server.socketPath);
  const missing = path.join(dir, 'missing.img');
  await t.throwsAsync(client.device(missing, { devDir: dir }), { code: 'ENOENT', message: /open/ });
  const e = await client.device(missing, { devDir: dir }).catch((x: unknown) => x as { syscall?: string; path?: string });
  t.like(e, { syscall: 'open', path: missing });
  await t.throwsAsync(client.device(file, { devDir: file }), { code: 'ENOTDIR' });
  const dev = await client.device(file, { devDir: dir, readOnly: true });
  t.is(dev.devname, 'loop100001', 'the first request that could open its paths is the first one sent');
  client.close();
  t.is(openFds(), before);
});

// A non-root client's node is `loopN.d/loopN` (in a directory of root's that only the server may empty); the
// client takes that form and plain `loopN`, nothing else, and leaves the former to the server.
loopTest.serial("devnames: loopN and loopN.d/loopN are taken, look-alikes are a protocol error; the server's own directory is left alone", async (t) => {
  const dir = tempDir(t);
  const file = path.join(dir, 'file');
  fs.writeFileSync(file, 'x');
  const bad = ['loop7.d/loop8', 'loop7.d/../loop7', '../loop7.d/loop7', 'loop7.d/loop7.d/loop7', 'loop7/loop7'];
  const server = await fakeServer(t, 'named', 0, ['loop7.d/loop7', ...bad]);
  using client = new LoopClient(server.socketPath);
  fs.mkdirSync(path.join(dir, 'loop7.d'));
  fs.writeFileSync(path.join(dir, 'loop7.d', 'loop7'), '');
  const dev = await client.device(file, { devDir: dir });
  t.like(dev, { devname: 'loop7.d/loop7', path: path.join(dir, 'loop7.d', 'loop7') });
  await dev.remove();
  t.true(dev.removed);
  t.true(fs.existsSync(dev.path), 'the node in the server\'s directory is the server\'s to remove');
  for (const name of bad) {
    const e = await t.throwsAsync(client.device(file, { devDir: dir }));
    t.regex(String((e as Error).message), /is not a loop device name/, name);
  }
});
