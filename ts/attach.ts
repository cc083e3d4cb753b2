/**
 * `attach()`: losetup from TypeScript. Opens the backing file (read-only when asked, or when it cannot be
 * written), binds it to a free loop device with direct I/O when the file system allows it, reads back what
 * the kernel applied and returns a `LoopDevice` that detaches (verified) on `detach()` / `await using`.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { configureArgs, native, type NativeAttach, type NativeAttached } from './binding.js';
import { LoopDevice, type Backing } from './device.js';
import { call, runAsync, runSync, type Flow, type Op } from './flow.js';
import { Loop, type ConfigureOptions } from './loop.js';
import { checkConfigure } from './options.js';
import { errnoCode, sysError, toLoopError } from './syserr.js';

export interface AttachOptions extends ConfigureOptions {
  /**
   * Default true: the kernel detaches the device at its last close, so it never outlives this process,
   * however the process ends (even SIGKILL). `false` for a device that must stay bound after the process
   * exits (what `loopdev attach` does); it is then yours to detach.
   */
  autoclear?: boolean;
  /** Hold `flock(LOCK_EX)` on the device while it is open (a device others keep locked is skipped for a new one). */
  lock?: boolean;
  /**
   * Direct I/O (O_DIRECT backing fd + LO_FLAGS_DIRECT_IO). Default true; falls back silently to buffered
   * I/O where the file system or the alignment refuses it — `LoopDevice.directIo` says what was applied.
   */
  directIo?: boolean;
  /**
   * Open the backing file O_RDONLY and bind read-only. Default: read-only only when the file cannot be
   * written (no write permission bits, read-only mount, EACCES/EPERM); given an fd, follows its open mode.
   */
  readOnly?: boolean;
  /** Alias of `blockSize` (osbuild's and losetup's name): the logical sector size. */
  sectorSize?: number | bigint;
}

const SECTOR = 512n;

const { O_RDONLY, O_RDWR, O_DIRECT, O_NONBLOCK, O_ACCMODE } = fs.constants as typeof fs.constants & {
  O_ACCMODE?: number;
};
const ACCMODE = O_ACCMODE ?? 3;

interface Normalized {
  offset: bigint;
  sizeLimit: bigint;
  blockSize: bigint | undefined;
  autoclear: boolean;
  partscan: boolean;
  readOnly: boolean | undefined;
  directIo: boolean;
  lock: boolean;
}

/**
 * Binds `file` (a path, or an open fd that stays the caller's) to a free loop device.
 * Errors are `LoopError`s (code/errno/syscall/path); nothing stays bound when it throws.
 */
export async function attach(file: string | number, options: AttachOptions = {}): Promise<LoopDevice> {
  try {
    return await runAsync(attachFlow(file, options));
  } catch (e) {
    throw toLoopError(e);
  }
}

/** `attach` blocking the thread. */
export function attachSync(file: string | number, options: AttachOptions = {}): LoopDevice {
  try {
    return runSync(attachFlow(file, options));
  } catch (e) {
    throw toLoopError(e);
  }
}

/** `checkConfigure` (the validation `Loop.configure` shares) plus attach's defaults. */
function normalize(options: AttachOptions): Normalized {
  if (options === null || typeof options !== 'object') {
    throw Object.assign(new TypeError('The "options" argument must be an object'), { code: 'ERR_INVALID_ARG_TYPE' });
  }
  const o = checkConfigure(options);
  const lock = (options as { lock?: unknown }).lock;
  if (lock !== undefined && lock !== null && typeof lock !== 'boolean') {
    throw Object.assign(new TypeError(`The "lock" option must be a boolean. Received ${typeof lock}`), {
      code: 'ERR_INVALID_ARG_TYPE',
    });
  }
  return {
    offset: o.offset ?? 0n,
    sizeLimit: o.sizeLimit ?? 0n,
    blockSize: o.blockSize,
    autoclear: o.autoclear ?? true,
    partscan: o.partscan ?? false,
    readOnly: o.readOnly,
    directIo: o.directIo ?? true,
    lock: lock ?? false,
  };
}

// ---- blocking steps with async twins ----

function statOp(p: string): Op<fs.BigIntStats> {
  return {
    sync: () => fs.statSync(p, { bigint: true }),
    async: () => fs.promises.stat(p, { bigint: true }),
  };
}

function fstatOp(fd: number): Op<fs.BigIntStats> {
  return {
    sync: () => fs.fstatSync(fd, { bigint: true }),
    async: () =>
      new Promise((resolve, reject) => fs.fstat(fd, { bigint: true }, (e, st) => (e ? reject(e) : resolve(st)))),
  };
}

function openOp(p: string, flags: number): Op<number> {
  return {
    sync: () => fs.openSync(p, flags),
    async: () => new Promise((resolve, reject) => fs.open(p, flags, (e, fd) => (e ? reject(e) : resolve(fd)))),
  };
}

function attachOp(fd: number, o: NativeAttach): Op<NativeAttached> {
  return {
    sync: () => native.attach(fd, configureArgs(o)),
    async: () => native.attachAsync(fd, configureArgs(o)),
  };
}

// ---- checks ----

/** Only regular files and block devices can back a loop device; say which rule a path breaks. */
function checkKind(st: fs.BigIntStats, p: string, syscall: string): void {
  if (st.isFile() || st.isBlockDevice()) return;
  if (st.isDirectory()) throw sysError('EISDIR', { syscall, path: p });
  // open(2) of a socket says ENXIO; say it before opening (a FIFO would block the open).
  if (st.isSocket()) throw sysError('ENXIO', { syscall, path: p });
  const kind = st.isFIFO() ? 'a FIFO' : st.isCharacterDevice() ? 'a character device' : 'not a regular file';
  throw sysError('EINVAL', { syscall, path: p, detail: `backing file is ${kind}, not a regular file or block device` });
}

/** `flags` of an open fd from /proc/self/fdinfo (access mode, O_DIRECT, …); null when unreadable. */
function fdFlags(fd: number): number | null {
  try {
    const m = /^flags:\s*([0-7]+)$/m.exec(fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'));
    return m ? parseInt(m[1]!, 8) : null;
  } catch {
    return null;
  }
}

function fdTarget(fd: number): string {
  try {
    return fs.readlinkSync(`/proc/self/fd/${fd}`);
  } catch {
    return `/proc/self/fd/${fd}`;
  }
}

// ---- the attach flow ----

function* attachFlow(file: string | number, options: AttachOptions): Flow<LoopDevice> {
  const o = normalize(options);
  let backing: Backing;
  let readOnly: boolean;
  let dio = o.directIo;
  let p: string;

  if (typeof file === 'number') {
    if (!Number.isInteger(file) || file < 0) {
      throw Object.assign(new RangeError(`The value of "fd" is out of range. Received ${file}`), {
        code: 'ERR_OUT_OF_RANGE',
      });
    }
    p = fdTarget(file);
    const st = yield* call(fstatOp(file));
    checkKind(st, p, 'fstat');
    const flags = fdFlags(file);
    const fdReadOnly = flags !== null && (flags & ACCMODE) === O_RDONLY;
    if (o.readOnly === false && fdReadOnly) {
      // As a path on a read-only mount fails with EROFS rather than binding read-only behind the caller's back.
      throw sysError('EBADF', {
        syscall: 'attach',
        path: p,
        detail: 'readOnly: false, but the fd is open O_RDONLY (a writable device needs an O_RDWR fd)',
      });
    }
    readOnly = o.readOnly === true || fdReadOnly;
    backing = { path: p, fd: file, owned: false, dev: st.dev, ino: st.ino };
  } else {
    if (typeof file !== 'string' || file === '') {
      throw Object.assign(new TypeError('The "file" argument must be a path or a file descriptor'), {
        code: 'ERR_INVALID_ARG_TYPE',
      });
    }
    p = path.resolve(file);
    const pre = yield* call(statOp(p));
    checkKind(pre, p, 'open');
    // A file nobody may write is meant to stay untouched, even by root (who could open it O_RDWR anyway).
    readOnly = o.readOnly ?? (Number(pre.mode) & 0o222) === 0;
    // O_DIRECT needs sector-aligned offsets; do not even try it otherwise.
    if (o.offset % SECTOR !== 0n) dio = false;
    let fd = -1;
    for (;;) {
      const flags = (readOnly ? O_RDONLY : O_RDWR) | O_NONBLOCK | (dio ? O_DIRECT : 0);
      try {
        fd = yield* call(openOp(p, flags));
        break;
      } catch (e) {
        const code = errnoCode(e);
        if (dio && code === 'EINVAL') {
          dio = false; // the file system has no O_DIRECT (ramfs, some FUSE, …)
          continue;
        }
        if (!readOnly && o.readOnly === undefined && ['EROFS', 'EACCES', 'EPERM', 'ETXTBSY'].includes(code ?? '')) {
          readOnly = true; // read-only mount, immutable file, no permission: attach read-only like losetup
          continue;
        }
        throw e;
      }
    }
    backing = { path: p, fd, owned: true, dev: 0n, ino: 0n };
  }

  try {
    // One call does the rest natively: check what was opened (the path may have been replaced since the
    // stat), bind a free device, verify what the kernel applied, retry on a fresh device, fall back to
    // buffered I/O (clearing O_DIRECT on our own fd) where direct I/O was refused.
    const raw = yield* call(
      attachOp(backing.fd, {
        offset: o.offset,
        sizeLimit: o.sizeLimit,
        autoclear: o.autoclear,
        partscan: o.partscan,
        readOnly,
        directIo: dio,
        ...(o.blockSize === undefined ? {} : { blockSize: o.blockSize }),
        fileName: backing.path,
        lock: o.lock,
        ownsFd: backing.owned,
      }),
    );
    backing.dev = raw.applied.device;
    backing.ino = raw.applied.inode;
    const dev = new LoopDevice(new Loop(raw, true), backing, raw.applied);
    // Kernels without table parsers create no partitions: register them from the table we read.
    if (o.partscan) dev.addPartitions();
    return dev;
  } catch (e) {
    if (backing.owned && backing.fd >= 0) fs.closeSync(backing.fd);
    throw e;
  }
}
