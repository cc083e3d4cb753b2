/**
 * The remote server under load, as a service sees it: many client processes asking at once, some of them
 * SIGKILLed at random points mid-request. No request that should succeed fails, nothing is left once the
 * clients are gone (devices, nodes, mounts, the server's fds), and the server's RSS stays flat.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { createInterface } from 'node:readline';
import { boundAfterSettling, mountsUnder, tempDir } from '../helpers.js';
import { finished, makeImage, ROOT, scaled, stressTest } from './fixtures.js';

const CLIENTS = 16;
const REQUESTS = scaled(50, 10);
const KILLED = 4;

/** osbuild's client protocol in a loop: connect, ask, check the node, hang up (the server releases). */
const CLIENT = String.raw`
import array, json, os, socket, stat, sys
sock, backing, dev_dir, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ok, failed = 0, []
for i in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind("")
    s.connect(sock)
    fds = [os.open(backing, os.O_RDWR), os.open(dev_dir, os.O_DIRECTORY)]
    req = b'{"fd": 0, "dir_fd": 1, "lock": false, "partscan": false, "read_only": false, "sector_size": 512}'
    s.sendmsg([req], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    for fd in fds:
        os.close(fd)
    reply = json.loads(s.recv(1 << 20))
    if "devname" in reply and stat.S_ISBLK(os.stat(os.path.join(dev_dir, reply["devname"])).st_mode):
        ok += 1
    else:
        failed.append(reply)
    print("done %d" % (i + 1), flush=True)
    s.close()
print(json.dumps({"ok": ok, "failed": failed[:3]}), flush=True)
`;

function vmRss(pid: number): number {
  const kb = /^VmRSS:\s+(\d+) kB$/m.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1];
  return Number(kb) * 1024;
}

function fdCount(pid: number): number {
  return fs.readdirSync(`/proc/${pid}/fd`).length;
}

async function round(socketPath: string, dir: string, kill: number): Promise<{ ok: number; failed: unknown[]; killed: number }> {
  let ok = 0;
  let killed = 0;
  const failed: unknown[] = [];
  await Promise.all(
    Array.from({ length: CLIENTS }, async (_, i) => {
      const own = path.join(dir, `client${i}`);
      fs.mkdirSync(own, { recursive: true });
      const file = makeImage(own, 'disk.img', 1 << 20);
      const child = spawn('python3', ['-c', CLIENT, socketPath, file, own, String(REQUESTS)], { stdio: ['ignore', 'pipe', 'pipe'] });
      const done = finished(child);
      if (i < kill) {
        // Killed after a random number of its requests, well before the last one, at a random moment:
        // mid-request, holding a device, or between two.
        const after = 1 + Math.floor(Math.random() * (REQUESTS - 6));
        const lines = createInterface({ input: child.stdout! });
        await new Promise<void>((resolve) =>
          lines.on('line', (line) => {
            if (line === `done ${after}`) resolve();
          }),
        );
        await new Promise((r) => setTimeout(r, Math.random() * 3));
        child.kill('SIGKILL');
      }
      const r = await done;
      if (r.signal === 'SIGKILL') {
        killed++;
        return;
      }
      const result = JSON.parse(r.stdout.trim().split('\n').pop()!) as { ok: number; failed: unknown[] };
      ok += result.ok;
      failed.push(...result.failed);
    }),
  );
  return { ok, failed, killed };
}

stressTest.serial(`${CLIENTS} client processes × ${REQUESTS} requests, ${KILLED} SIGKILLed: all served, nothing left`, async (t) => {
  t.timeout(240_000);
  const dir = tempDir(t);
  const socketPath = path.join(dir, 'remoteloop');
  const server = spawn(process.execPath, ['--import=tsx', path.join(ROOT, '__test__/fixtures/remote-serve.ts'), socketPath], {
    cwd: ROOT,
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const stopped = finished(server);
  t.teardown(() => {
    if (server.exitCode === null) server.kill('SIGKILL');
  });
  await new Promise((resolve) => createInterface({ input: server.stdout! }).once('line', resolve));

  // A first round warms the server up (workers, allocator); the second is measured against it.
  const warm = await round(socketPath, path.join(dir, 'warm'), 0);
  t.is(warm.ok, CLIENTS * REQUESTS, JSON.stringify(warm.failed.slice(0, 2)));
  const rssBefore = vmRss(server.pid!);
  const fdsBefore = fdCount(server.pid!);
  const load = await round(socketPath, path.join(dir, 'load'), KILLED);
  t.is(load.killed, KILLED);
  t.deepEqual(load.failed, [], 'no request of a client that lived failed');
  t.is(load.ok, (CLIENTS - KILLED) * REQUESTS);

  t.deepEqual(await boundAfterSettling(dir, 10_000), [], 'no device left bound, killed clients included');
  t.deepEqual(mountsUnder(dir), [], 'no node (bind mount) left');
  for (let i = 0; i < 200 && fdCount(server.pid!) !== fdsBefore; i++) await new Promise((r) => setTimeout(r, 50));
  t.is(fdCount(server.pid!), fdsBefore, "the server's fds are back where they were");
  const growth = vmRss(server.pid!) - rssBefore;
  t.log(`server RSS ${(rssBefore / 2 ** 20).toFixed(1)} MiB, then ${(growth / 2 ** 20).toFixed(2)} MiB more after ${CLIENTS * REQUESTS} requests`);
  t.true(growth < 8 * 2 ** 20, 'server RSS flat (under 8 MiB of growth)');
  for (const name of fs.readdirSync(path.join(dir, 'load'))) {
    t.deepEqual(fs.readdirSync(path.join(dir, 'load', name)), ['disk.img'], `${name}: no node left`);
  }

  server.kill('SIGTERM');
  const end = await stopped;
  t.is(end.code, 0, end.stderr);
});
