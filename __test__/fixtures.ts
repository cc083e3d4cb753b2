/**
 * Fixtures for the attach/list/CLI specs (on top of helpers.ts): tools, mounts, file systems, fd flags,
 * losetup's view, and running the CLI. Every mount is unmounted and every device detached in teardown.
 */
import type { ExecutionContext } from 'ava';
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { attach, type AttachOptions, type LoopDevice } from '../ts/index.js';

export const ROOT = path.dirname(path.dirname(fileURLToPath(import.meta.url)));
export const CLI = path.join(ROOT, 'ts', 'cli.ts');
/** A LoopServer in a process of its own (`node --import=tsx REMOTE_SERVE SOCKET [UID,...]`). */
export const REMOTE_SERVE = path.join(ROOT, '__test__', 'fixtures', 'remote-serve.ts');

/** Absolute path of an executable (PATH, then the sbin dirs), or null. */
export function tool(name: string): string | null {
  for (const dir of [...(process.env.PATH ?? '').split(':'), '/usr/sbin', '/sbin', '/usr/bin', '/bin']) {
    if (!dir) continue;
    try {
      fs.accessSync(path.join(dir, name), fs.constants.X_OK);
      return path.join(dir, name);
    } catch {
      /* next */
    }
  }
  return null;
}

/** A sparse file of `size` bytes (not opened). */
export function sparseFile(dir: string, size: number, name = 'disk.img'): string {
  const file = path.join(dir, name);
  fs.writeFileSync(file, '');
  fs.truncateSync(file, size);
  return file;
}

/** `attach()` with a teardown that detaches the device if the test did not (never anyone else's). */
export async function attached(t: ExecutionContext, file: string | number, o?: AttachOptions): Promise<LoopDevice> {
  const dev = await attach(file, o);
  t.teardown(async () => {
    if (!dev.released || !dev.closed) await dev.detach(5000).catch(() => undefined);
  });
  return dev;
}

/** Mounts in a fresh mount point inside `dir`; unmounted in teardown (lazily if still busy). */
export function mount(t: ExecutionContext, dir: string, source: string, args: string[]): string {
  const target = fs.mkdtempSync(path.join(dir, 'mnt-'));
  execFileSync('mount', [...args, source, target]);
  t.teardown(() => {
    if (!isMountPoint(target)) return;
    if (spawnSync('umount', [target]).status !== 0) spawnSync('umount', ['-l', target]);
  });
  return target;
}

function isMountPoint(p: string): boolean {
  return fs
    .readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .some((line) => line.split(' ')[4] === p);
}

/** Unmounts `target` now (the teardown then has nothing to do). */
export function umount(target: string): void {
  execFileSync('umount', [target]);
}

/** A ramfs (no O_DIRECT support) mounted on a fresh dir; unmounted in teardown. */
export function ramfs(t: ExecutionContext, dir: string): string {
  return mount(t, dir, 'ramfs', ['-t', 'ramfs']);
}

/** `dir` bind-mounted read-only at a fresh mount point; unmounted in teardown. */
export function readOnlyBind(t: ExecutionContext, dir: string, src: string): string {
  const target = mount(t, dir, src, ['--bind']);
  execFileSync('mount', ['-o', 'remount,bind,ro', target]);
  return target;
}

export function sha256(file: string): string {
  const hash = createHash('sha256');
  const fd = fs.openSync(file, 'r');
  try {
    const buf = Buffer.alloc(4 << 20);
    for (let n; (n = fs.readSync(fd, buf, 0, buf.length, null)) > 0; ) hash.update(buf.subarray(0, n));
  } finally {
    fs.closeSync(fd);
  }
  return hash.digest('hex');
}

/** `flags` of an open fd (octal in /proc/self/fdinfo). */
export function fdFlags(fd: number): number {
  const m = /^flags:\s*([0-7]+)$/m.exec(fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'));
  if (!m) throw new Error(`no flags for fd ${fd}`);
  return parseInt(m[1]!, 8);
}

export const O_ACCMODE = 3;

export function hasODirect(fd: number): boolean {
  return (fdFlags(fd) & fs.constants.O_DIRECT) !== 0;
}

export function isReadOnlyFd(fd: number): boolean {
  return (fdFlags(fd) & O_ACCMODE) === fs.constants.O_RDONLY;
}

export type LosetupEntry = Record<string, string | number | boolean | null>;

/**
 * `losetup --json --list` entries by device path, values trimmed (losetup 2.38 pads MAJ:MIN in JSON).
 * With `--output-all` losetup opens each device it lists (for BACK-INO), and a stray opener makes another
 * test's detach wait, so `all` lists only the given devices (ours).
 */
export function losetupList(all?: { devices: string[] }): Map<string, LosetupEntry> {
  // One device per call: `losetup --list DEV FILE` would mean "set up DEV with FILE".
  const calls = all ? all.devices.map((d) => ['--json', '--list', '--output-all', d]) : [['--json', '--list']];
  const entries: [string, LosetupEntry][] = [];
  for (const args of calls) {
    const text = execFileSync('losetup', args).toString();
    const parsed = JSON.parse(text.trim() ? text : '{"loopdevices":[]}') as { loopdevices?: LosetupEntry[] };
    for (const e of parsed.loopdevices ?? []) {
      const trimmed = Object.entries(e).map(([k, v]) => [k, typeof v === 'string' ? v.trim() : v]);
      entries.push([String(e.name), Object.fromEntries(trimmed) as LosetupEntry]);
    }
  }
  return new Map(entries);
}

/** An MBR table with two Linux partitions (1 MiB at 1 MiB, the rest after it) written by sfdisk. */
export function partitionImage(file: string): void {
  const input = 'label: dos\nstart=2048, size=2048, type=83\nstart=4096, type=83\n';
  execFileSync(tool('sfdisk')!, ['-q', file], { input });
}

export interface CliResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Runs `loopdev ARGS` (ts/cli.ts through tsx) to completion. */
export function cli(args: string[], env: NodeJS.ProcessEnv = {}, nodeArgs: string[] = []): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const child = spawnCli(args, env, nodeArgs);
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', reject);
    child.on('close', (code, signal) => resolve({ code, signal, stdout, stderr }));
  });
}

export function spawnCli(args: string[], env: NodeJS.ProcessEnv = {}, nodeArgs: string[] = []) {
  return spawn(process.execPath, [...nodeArgs, '--import=tsx', CLI, ...args], {
    cwd: ROOT,
    env: { ...process.env, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
}

/** `losetup --find --show ARGS FILE`, retried: losetup's free-device pick races with concurrent tests. */
export function losetupAttach(file: string, args: string[] = []): string {
  for (let attempt = 0; ; attempt++) {
    const r = spawnSync('losetup', ['--find', '--show', ...args, file]);
    if (r.status === 0) return r.stdout.toString().trim();
    if (attempt >= 20) throw new Error(`losetup failed: ${r.stderr.toString().trim()}`);
    execFileSync('sleep', ['0.05']);
  }
}

/**
 * Python: `locked_pipe(k)` → `(r, w, ends)`, a pipe whose lock a thread of the calling process holds for as
 * long as the process lives (splicing into a full socket nobody reads), and `k` more write-end files of it
 * (opened before the lock is taken: opening one takes it too). The last release of any of these files
 * blocks, uninterruptibly: how any user can make a close block (red team round 8). Needs `os`, `socket`,
 * `threading` and `time` imported.
 */
export const LOCKED_PIPE = String.raw`
_locked = []
def locked_pipe(k=0):
    r, w = os.pipe()
    ends = [os.open("/proc/self/fd/%d" % w, os.O_WRONLY) for _ in range(k)]
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    try:
        while True:
            a.send(b"\0" * 65536)
    except BlockingIOError:
        pass
    a.setblocking(True)
    os.write(w, b"y" * 4096)
    tid = []
    def splice():
        tid.append(threading.get_native_id())
        os.splice(r, a.fileno(), 4096)
    threading.Thread(target=splice, daemon=True).start()
    # Locked once the thread waits for room in the socket, holding the pipe's lock: a fixed 0.2 s was not
    # always enough on a loaded machine (CI: 1 of 10 closes wedged, and the test proved nothing).
    deadline = time.time() + 30
    while not tid or not any(name in open("/proc/self/task/%d/wchan" % tid[0]).read() for name in ("sock", "unix")):
        if time.time() > deadline:
            raise RuntimeError("the splice thread never waited for the socket")
        time.sleep(0.005)
    _locked.append((a, b))
    return r, w, ends
`;
