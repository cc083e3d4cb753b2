/**
 * `attach()`: losetup from TypeScript. Opens the backing file (read-only when asked, or when it cannot be
 * written), binds it to a free loop device with direct I/O when the file system allows it, reads back what
 * the kernel applied and returns a `LoopDevice` that detaches (verified) on `detach()` / `await using`.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { configureArgs, native, type Handle, type NativeConfigure, type NativeLoop } from './binding.js';
import { LoopDevice, type Backing } from './device.js';
import { call, runAsync, runSync, type Flow, type Op } from './flow.js';
import { LoopInfo } from './info.js';
import { Loop, type ConfigureOptions } from './loop.js';
import { toU64 } from './size.js';
import { blockDeviceSize, devMajor, devMinor, readLoop, type SysfsLoop } from './sysfs.js';
import { loopError } from './errors.js';
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

/** How often a binding that does not verify is retried on a fresh device before giving up. */
const VERIFY_ATTEMPTS = 2;
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

function normalize(o: AttachOptions): Normalized {
  if (o === null || typeof o !== 'object') {
    throw Object.assign(new TypeError('The "options" argument must be an object'), { code: 'ERR_INVALID_ARG_TYPE' });
  }
  let blockSize = o.blockSize === undefined ? undefined : toU64(o.blockSize, 'blockSize');
  if (o.sectorSize !== undefined) {
    const s = toU64(o.sectorSize, 'sectorSize');
    if (blockSize !== undefined && blockSize !== s) {
      throw Object.assign(new TypeError('"blockSize" and "sectorSize" disagree; pass one of them'), {
        code: 'ERR_INVALID_ARG_VALUE',
      });
    }
    blockSize = s;
  }
  return {
    offset: o.offset === undefined ? 0n : toU64(o.offset, 'offset'),
    sizeLimit: o.sizeLimit === undefined ? 0n : toU64(o.sizeLimit, 'sizeLimit'),
    blockSize,
    autoclear: o.autoclear ?? true,
    partscan: o.partscan ?? false,
    readOnly: o.readOnly,
    directIo: o.directIo ?? true,
    lock: o.lock ?? false,
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

function loopForFdOp(ctl: Handle, fd: number, o: NativeConfigure, lock: boolean): Op<NativeLoop> {
  return {
    sync: () => native.controlLoopForFd(ctl, fd, configureArgs(o), lock),
    async: () => native.controlLoopForFdAsync(ctl, fd, configureArgs(o), lock),
  };
}

function releaseOp(dev: LoopDevice): Op<void> {
  return { sync: () => dev.detachSync(), async: () => dev.detach() };
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

function backingSize(st: fs.BigIntStats): bigint {
  if (!st.isBlockDevice()) return st.size;
  return blockDeviceSize(devMajor(st.rdev), devMinor(st.rdev)) ?? 0n;
}

/** The device size the kernel should produce: what is left after the offset, capped by the size limit. */
function expectedSize(fileSize: bigint, o: Normalized, p: string): bigint {
  const fail = (detail: string) => sysError('EINVAL', { syscall: 'fstat', path: p, detail });
  if (fileSize === 0n) throw fail('backing file is empty');
  if (o.offset >= fileSize) {
    throw fail(`offset ${o.offset} is at or beyond the end of the backing file (${fileSize} bytes)`);
  }
  let size = fileSize - o.offset;
  if (o.sizeLimit > 0n && o.sizeLimit < size) size = o.sizeLimit;
  size -= size % SECTOR;
  if (size === 0n) throw fail(`less than one ${SECTOR}-byte sector to map after offset ${o.offset}`);
  return size;
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

function readApplied(raw: NativeLoop): { applied: SysfsLoop; info: LoopInfo } | null {
  const info = new LoopInfo(native.loopGetStatus(raw.handle));
  const sys = readLoop(`loop${raw.minor}`);
  if (sys === null) return null;
  return { info, applied: sys };
}

interface Expected {
  dev: bigint;
  ino: bigint;
  size: bigint;
  readOnly: boolean;
  o: Normalized;
}

/** Differences between what was asked and what the kernel applied (systemd's loop_configure_verify). */
function verify(got: { applied: SysfsLoop; info: LoopInfo } | null, want: Expected): string[] {
  if (got === null) return ['the device is not bound according to sysfs'];
  const { applied: a, info } = got;
  const diffs: string[] = [];
  const check = (what: string, have: unknown, wanted: unknown) => {
    if (have !== wanted) diffs.push(`${what} is ${String(have)}, expected ${String(wanted)}`);
  };
  if (!info.isBoundTo({ dev: want.dev, ino: want.ino })) diffs.push('the device is bound to another file');
  check('offset', a.offset, want.o.offset);
  check('size limit', a.sizeLimit, want.o.sizeLimit);
  check('size', a.size, want.size);
  if (want.o.blockSize !== undefined) check('sector size', BigInt(a.blockSize), want.o.blockSize);
  check('read-only', a.readOnly, want.readOnly);
  if (want.o.partscan) check('partscan', a.partscan, true);
  check('autoclear', a.autoclear, want.o.autoclear);
  return diffs;
}

// ---- the attach flow ----

function* attachFlow(file: string | number, options: AttachOptions): Flow<LoopDevice> {
  const o = normalize(options);
  let backing: Backing | null = null;
  let readOnly: boolean;
  let dio = o.directIo;
  let odirect = false; // the fd we opened has O_DIRECT
  let st: fs.BigIntStats | undefined;
  let p: string;

  if (typeof file === 'number') {
    if (!Number.isInteger(file) || file < 0) {
      throw Object.assign(new RangeError(`The value of "fd" is out of range. Received ${file}`), {
        code: 'ERR_OUT_OF_RANGE',
      });
    }
    p = fdTarget(file);
    st = yield* call(fstatOp(file));
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
        odirect = dio;
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

  let ctl: Handle | null = null;
  try {
    if (st === undefined) {
      // Check what was opened, not what was stat'ed before: the path may have been replaced in between.
      st = yield* call(fstatOp(backing.fd));
      checkKind(st, p, 'open');
      backing.dev = st.dev;
      backing.ino = st.ino;
    }
    const want: Expected = {
      dev: backing.dev,
      ino: backing.ino,
      size: expectedSize(backingSize(st), o, p),
      readOnly,
      o,
    };
    ctl = native.controlOpen();
    let diffs: string[] = [];
    for (let attempt = 0; attempt < VERIFY_ATTEMPTS; ) {
      const config: NativeConfigure = {
        offset: o.offset,
        sizeLimit: o.sizeLimit,
        autoclear: o.autoclear,
        partscan: o.partscan,
        readOnly,
        directIo: dio,
        ...(o.blockSize === undefined ? {} : { blockSize: o.blockSize }),
        ...(backing.path === undefined ? {} : { fileName: backing.path }),
      };
      const raw = yield* call(loopForFdOp(ctl, backing.fd, config, o.lock));
      let got: ReturnType<typeof readApplied>;
      try {
        got = readApplied(raw);
      } catch (e) {
        // Cannot even read it back: give the device up (it is ours) and report why.
        yield* call(releaseOp(new LoopDevice(new Loop(raw, true), { ...backing, owned: false }, placeholder(raw))));
        throw e;
      }
      diffs = verify(got, want);
      const dioRefused = dio && got !== null && !got.applied.directIo;
      if (diffs.length === 0 && !(dioRefused && odirect && backing.owned)) {
        const dev = new LoopDevice(new Loop(raw, true), backing, got!.applied);
        // Kernels without table parsers create no partitions: register them from the table we read.
        if (o.partscan) dev.addPartitions();
        return dev;
      }
      // Give the device back before trying again; it carries our binding, so clearing it is ours to do.
      yield* call(releaseOp(new LoopDevice(new Loop(raw, true), { ...backing, owned: false }, got?.applied ?? placeholder(raw))));
      if (diffs.length === 0) {
        // Direct I/O refused (alignment, sector size) on an O_DIRECT fd: the kernel would still do direct
        // I/O through the fd's own O_DIRECT, so rebind buffered through a plain fd (as systemd does).
        dio = false;
        odirect = false;
        const fd = yield* call(openOp(p, (readOnly ? O_RDONLY : O_RDWR) | O_NONBLOCK));
        fs.closeSync(backing.fd);
        backing.fd = fd;
        const again = yield* call(fstatOp(fd));
        if (again.dev !== backing.dev || again.ino !== backing.ino) {
          throw loopError('ERR_LOOP_BACKING_CHANGED', 'the backing file was replaced while attaching', p);
        }
        continue;
      }
      attempt++;
    }
    throw loopError(
      'ERR_LOOP_CONFIG_MISMATCH',
      `the kernel did not apply the requested configuration (${diffs.join('; ')}) after ${VERIFY_ATTEMPTS} attempts`,
      p,
    );
  } catch (e) {
    if (backing.owned && backing.fd >= 0) fs.closeSync(backing.fd);
    throw e;
  } finally {
    if (ctl !== null) native.close(ctl);
  }
}

/** For releasing a device whose state could not be read: no diskseq, so release is judged by the path. */
function placeholder(raw: NativeLoop): SysfsLoop {
  const name = `loop${raw.minor}`;
  return (
    readLoop(name) ?? {
      name,
      number: raw.minor,
      majMin: '',
      readOnly: false,
      directIo: false,
      partscan: false,
      autoclear: false,
      offset: 0n,
      sizeLimit: 0n,
      size: 0n,
      blockSize: 512,
      backingFile: '',
      diskseq: null,
    }
  );
}
