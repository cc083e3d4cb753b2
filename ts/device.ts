/** `LoopDevice`: what `attach()` returns — a bound loop device that owns its cleanup. */
import * as fs from 'node:fs';
import { native } from './binding.js';
import { call, runAsync, runSync, sleep, type Flow, type Op } from './flow.js';
import type { LoopInfo } from './info.js';
import { deviceInfoSync, loopName } from './list.js';
import { closeOffThread, DETACH_TIMEOUT_MS, handleOf, Loop } from './loop.js';
import { findPartition, fromNative, type Partition, type PartitionQuery, type PartitionTable } from './partitions.js';
import type { LoopBinding, LoopDeviceInfo } from './state.js';
import { holders, holdersOf } from './holders.js';
import { bindingGone, loopNumber, readAttr, readLoop, type SysfsLoop } from './sysfs.js';
import { errnoCode, sysError, toLoopError } from './syserr.js';

const POLL_MS = 5;

/** The backing file as attach saw it. */
export interface Backing {
  /** Absolute path given to attach, or what `/proc/self/fd/N` points at for an fd. */
  path: string;
  fd: number;
  /** True when attach opened the fd itself (then detach/close close it). */
  owned: boolean;
  dev: bigint;
  ino: bigint;
}

/**
 * A loop device bound by `attach()` (or taken over with `LoopDevice.open()`). It has a `Loop` (`loop`) and
 * offers what a bound device supports; it does not offer what would break its binding (setFd, configure,
 * clearFd, changeFd, setStatus: use `loop` for those, at your own risk). The `LoopBinding` fields describe
 * the binding as the kernel applied it, read back at attach time and after each change made through this
 * object (`info()` reads it anew, `getStatus()` gives the raw LOOP_GET_STATUS64). `detach()` is verified:
 * it returns once the kernel has really released the backing file, and closes the device.
 * `using`/`await using` detach on every exit path.
 */
export class LoopDevice implements LoopBinding, Disposable, AsyncDisposable {
  readonly #loop: Loop;
  readonly minor: number;
  /** `loop3` */
  readonly devname: string;
  /** `/dev/loop3` */
  readonly path: string;
  /** The backing file: the path given to attach (absolute), or the fd's target. */
  readonly backingFile: string;
  /** Whether attach opened the backing fd itself (it is then closed by detach/close; else the caller's). */
  readonly ownsBackingFd: boolean;
  /** `st_dev` / `st_ino` of the backing file. */
  readonly device: bigint;
  readonly inode: bigint;
  // The rest of the binding, as the kernel applied it: set from sysfs by #apply.
  declare readonly offset: bigint;
  declare readonly sizeLimit: bigint;
  /** Device size in bytes. */
  declare readonly size: bigint;
  /** Logical sector size in bytes. */
  declare readonly blockSize: number;
  declare readonly readOnly: boolean;
  declare readonly autoclear: boolean;
  declare readonly partscan: boolean;
  /** Direct I/O in effect (false after a silent fallback to buffered I/O). */
  declare readonly directIo: boolean;

  #backingFd: number;
  /** Partitions this object registered (BLKPG): removed again by detach. */
  #addedPartitions: number[] = [];
  /** The binding attach made, as sysfs named it: `released` compares with it. */
  readonly #sysfsBacking: string;
  readonly #diskseq: bigint | null;

  /**
   * @internal Built by `attach()` and `LoopDevice.open()`: takes ownership of `lo` (and of the backing fd when
   * `backing.owned`); `state` is what sysfs reported right after the bind.
   */
  constructor(lo: Loop, backing: Backing, state: BoundState) {
    this.#loop = lo;
    this.minor = lo.minor;
    this.devname = lo.devname;
    this.path = lo.path;
    this.backingFile = backing.path;
    this.ownsBackingFd = backing.owned;
    this.device = backing.dev;
    this.inode = backing.ino;
    this.#backingFd = backing.fd;
    this.#apply(state);
    this.#sysfsBacking = state.backingFile;
    this.#diskseq = state.diskseq;
  }

  /**
   * Takes charge of a device that is already bound (`/dev/loop3`, `loop3` or `3`), e.g. one attached by
   * `loopdev attach` or losetup, so that it can be detached (verified) or inspected. ENXIO when unbound.
   */
  static open(device: string | number): LoopDevice {
    try {
      const name = loopName(device);
      const lo = new Loop(loopNumber(name));
      let ok = false;
      try {
        let info: LoopInfo;
        try {
          info = lo.getStatus();
        } catch (e) {
          if (errnoCode(e) === 'ENXIO') {
            throw notAttached(lo.path);
          }
          throw e;
        }
        const sys = readLoop(name);
        if (sys === null) {
          throw notAttached(lo.path);
        }
        const dev = new LoopDevice(
          lo,
          { path: sys.backingFile, fd: -1, owned: false, dev: info.device, ino: info.inode },
          sys,
        );
        ok = true;
        return dev;
      } finally {
        if (!ok) lo.close();
      }
    } catch (e) {
      throw toLoopError(e);
    }
  }

  /** The underlying `Loop`, for the calls LoopDevice does not offer. Closed once this device is. */
  get loop(): Loop {
    return this.#loop;
  }

  /** The device's file descriptor; -1 once closed. */
  get fd(): number {
    return this.#loop.fd;
  }

  get closed(): boolean {
    return this.#loop.closed;
  }

  /** The device as `list()` describes it, read now; null once it is no longer bound. */
  info(): LoopDeviceInfo | null {
    return this.released ? null : deviceInfoSync(this.devname);
  }

  /** LOOP_GET_STATUS64 (`struct loop_info64`); ENXIO when unbound. */
  getStatus(): LoopInfo {
    return this.#loop.getStatus();
  }

  /** Whether the device is bound to the inode behind `fd` (false when unbound). */
  isBoundTo(fd: number): boolean {
    return this.#loop.isBoundTo(fd);
  }

  /** flock(2): `LOCK_SH`/`LOCK_EX`, `| LOCK_NB`, or `LOCK_UN`. */
  flock(op: number): void {
    this.#loop.flock(op);
  }

  /** BLKFLSBUF: drop the device's buffer cache. */
  flushBuf(): void {
    this.#loop.flushBuf();
  }

  /** LOOP_SET_DIRECT_IO; `directIo` then says what the kernel applied. */
  setDirectIo(on = true): void {
    this.#change(() => this.#loop.setDirectIo(on));
  }

  /** LOOP_SET_BLOCK_SIZE: the logical sector size; `blockSize` then says what the kernel applied. */
  setBlockSize(size: number | bigint): void {
    this.#change(() => this.#loop.setBlockSize(size));
  }

  /** LOOP_SET_CAPACITY: pick up a grown or shrunk backing file (`size` follows). */
  setCapacity(): void {
    this.#change(() => this.#loop.setCapacity());
  }

  /** Runs an ioctl that changes the binding, then reads it back from sysfs (while it is still attach's). */
  #change(ioctl: () => void): void {
    try {
      ioctl();
    } finally {
      const sys = this.released ? null : readLoop(this.devname);
      if (sys !== null) this.#apply(sys);
    }
  }

  #apply(state: BoundState): void {
    for (const k of APPLIED) (this as Record<(typeof APPLIED)[number], unknown>)[k] = state[k];
  }

  /** The backing fd (attach's own, or the caller's); -1 once an owned one was closed. */
  get backingFd(): number {
    return this.#backingFd;
  }

  /**
   * Closes the device (and the backing fd attach opened) without detaching: the binding stays unless
   * autoclear was set, in which case the kernel detaches at the last close.
   */
  close(): void {
    try {
      this.#loop.close();
    } finally {
      this.#closeBacking();
    }
  }

  /** `close()` for the detach flow; its async twin closes the device off the event loop (`closeOffThread`). */
  #closeOp(): Op<void> {
    return {
      sync: () => this.close(),
      async: async () => {
        try {
          await closeOffThread(this.#loop);
        } finally {
          this.#closeBacking();
        }
      },
    };
  }

  #closeBacking(): void {
    if (this.ownsBackingFd && this.#backingFd >= 0) {
      const fd = this.#backingFd;
      this.#backingFd = -1;
      fs.closeSync(fd);
    }
  }

  /** Whether the kernel no longer carries the binding attach made (unbound, or bound anew). */
  get released(): boolean {
    return bindingGone(this.devname, this.#diskseq, this.#sysfsBacking);
  }

  /**
   * The partition table read from the device (GPT or MBR) at its logical sector size; null when it has none.
   * A table that cannot be trusted (CRC mismatch, misplaced structures, truncated image) throws a LoopError
   * with `code: 'ERR_LOOP_PARTITION_TABLE'`; a bad entry is left out and named in `warnings`.
   */
  partitionTable(): PartitionTable | null {
    const t = native.loopPartitionTable(handleOf(this.#loop));
    return t === null ? null : fromNative(t, this.path);
  }

  /**
   * The partitions of the table, in table order, with their nodes (`/dev/loop3p1`, which exist only on a
   * partscan device, once the kernel has them: see `waitForPartitions`). `[]` without a table.
   */
  partitions(): Partition[] {
    return this.partitionTable()?.partitions ?? [];
  }

  /** The first partition matching `query` (`{ type: 'esp' }`, `{ label: 'root' }`, `{ number: 2 }`), or null. */
  partition(query: PartitionQuery): Partition | null {
    return findPartition(this.partitions(), query);
  }

  /**
   * Registers (BLKPG_ADD_PARTITION, as `partx -a` does) every partition of the table that the kernel has not
   * created: kernels built without partition-table parsers create none. `attach({ partscan: true })` does
   * this; call it on a device taken over with `LoopDevice.open()`. What it adds, detach removes. Never throws
   * for the table: what could not be done is a process warning (`code: 'LOOPDEV_PARTITIONS'`). Returns the
   * numbers it added.
   */
  addPartitions(): number[] {
    let r: ReturnType<typeof native.loopAddPartitions>;
    try {
      r = native.loopAddPartitions(handleOf(this.#loop));
    } catch (e) {
      warnPartitions(`${this.path}: no partitions registered: ${(e as Error).message}`);
      return [];
    }
    for (const w of r.warnings) warnPartitions(`${this.path}: ${w}`);
    this.#addedPartitions = [...new Set([...this.#addedPartitions, ...r.added])];
    return r.added;
  }

  /**
   * The partitions, once their nodes exist. The table says how many to expect: without partscan, or with no
   * partition in the table, this returns `[]` at once. Otherwise it waits (up to `timeoutMs`) for devtmpfs to
   * create the nodes and for sysfs to be stable (a rescan by udev removes and re-adds them), and returns the
   * partitions whose nodes exist by then. A table that cannot be trusted throws, as `partitions()` does.
   */
  async waitForPartitions(timeoutMs = 2000): Promise<Partition[]> {
    const deadline = Date.now() + timeoutMs;
    if (readAttr(this.devname, 'loop/partscan') !== '1') return [];
    const parts = this.partitions();
    if (parts.length === 0) return [];
    let previous = '';
    for (;;) {
      const present = parts.filter((p) => fs.existsSync(p.node) && readAttr(this.devname, `${nodeName(p)}/dev`) !== null);
      const key = present.map((p) => `${p.number}:${readAttr(this.devname, `${nodeName(p)}/dev`)}`).join(' ');
      if (present.length === parts.length && key === previous) return parts;
      if (Date.now() >= deadline) return present;
      previous = present.length === parts.length ? key : '';
      await new Promise((resolve) => setTimeout(resolve, previous ? 2 : 10));
    }
  }

  /** BLKPG_DEL_PARTITION for what `addPartitions` added; one that is in use (mounted) stays for a retry. */
  #removeAddedPartitions(): void {
    const left: number[] = [];
    for (const n of this.#addedPartitions) {
      try {
        native.loopRemovePartition(handleOf(this.#loop), n);
      } catch (e) {
        // Mounted or open: the detach that follows names what holds it; a later detach tries again.
        if (errnoCode(e) !== 'EBUSY') throw e;
        left.push(n);
      }
    }
    this.#addedPartitions = left;
  }

  /**
   * Verified detach: clears the binding (only if it is still this attach's), closes the device and the
   * backing fd attach opened, then waits until sysfs shows the device no longer refers to the file.
   * While something else keeps the device open the kernel cannot finish (it does at their last close): a
   * mount or a sysfs holder fails at once with EBUSY, another process's fd after a moment (a udev probe
   * lets go by then), each naming what holds it (`heldBy`); ETIMEDOUT after `timeoutMs` when nothing could
   * be named. `lazy: true` is `losetup -d`: clear and close, and leave the rest to the kernel. Idempotent.
   */
  detach(options: number | DetachOptions = {}): Promise<void> {
    return runAsync(this.#detachFlow(detachOptions(options)));
  }

  detachSync(options: number | DetachOptions = {}): void {
    runSync(this.#detachFlow(detachOptions(options)));
  }

  /** What keeps the device open now (see `holdersOf`): `mounted at /mnt`, `open in process 42 (dd)`, … */
  heldBy(): string[] {
    return holdersOf(this.devname);
  }

  *#detachFlow({ timeoutMs, lazy }: Required<DetachOptions>): Flow<void> {
    const start = Date.now();
    const deadline = start + timeoutMs;
    let nextLook = start;
    try {
      if (!this.closed) {
        this.#removeAddedPartitions();
        this.#clearIfOurs(this.#loop);
        yield* call(this.#closeOp());
      } else if (!this.released) {
        // Closed without detaching: open the node again just long enough to clear our binding.
        let lo: Loop | null = null;
        try {
          lo = new Loop(this.minor);
        } catch (e) {
          if (errnoCode(e) !== 'ENOENT' && errnoCode(e) !== 'ENXIO') throw e;
        }
        if (lo) {
          try {
            this.#clearIfOurs(lo);
          } finally {
            lo.close();
          }
        }
      }
      if (lazy) return;
      while (!this.released) {
        const lookedAt = Date.now();
        if (lookedAt >= nextLook && lookedAt < deadline) {
          // Mounts and holders do not go away by themselves; a process may (udev's probe holds it briefly).
          // Times are taken before the scan of /proc, which can be slow: it must not decide the outcome.
          nextLook = lookedAt + LOOK_EVERY_MS;
          const held = yield* call(holders(this.devname));
          const lasting = held.filter((h) => !h.startsWith('open in process'));
          if (lasting.length > 0 || (held.length > 0 && lookedAt - start >= PROCESS_GRACE_MS)) {
            throw sysError('EBUSY', {
              syscall: 'ioctl',
              ioctl: 'LOOP_CLR_FD',
              path: this.path,
              detail: `still bound to '${this.backingFile}': ${held.join(', ')}; the kernel detaches it at its last close`,
              heldBy: held,
            });
          }
        }
        if (Date.now() >= deadline) {
          throw sysError('ETIMEDOUT', {
            syscall: 'ioctl',
            ioctl: 'LOOP_CLR_FD',
            path: this.path,
            detail:
              `still bound to '${this.backingFile}' after ${timeoutMs} ms: the device is open elsewhere ` +
              '(mounted?); the kernel detaches it at its last close',
          });
        }
        yield* call(sleep(POLL_MS));
      }
    } finally {
      this.#closeBacking();
    }
  }

  /** LOOP_CLR_FD through `lo`, but only while the device still carries this attach's binding. */
  #clearIfOurs(lo: Loop): void {
    let ours: boolean;
    try {
      ours = lo.getStatus().isBoundTo({ dev: this.device, ino: this.inode }) && !this.released;
    } catch (e) {
      if (errnoCode(e) === 'ENXIO') return; // already being torn down
      throw e;
    }
    if (!ours) return;
    try {
      lo.clearFd();
    } catch (e) {
      if (errnoCode(e) !== 'ENXIO') throw e;
    }
  }

  /** Verified detach (see `detachSync`); never leaves the device open. */
  [Symbol.dispose](): void {
    this.detachSync();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.detach();
  }
}

/** The `LoopBinding` fields read from sysfs (the backing file's are attach's). */
const APPLIED = ['offset', 'sizeLimit', 'size', 'blockSize', 'readOnly', 'autoclear', 'partscan', 'directIo'] as const;

/** What a LoopDevice is made from: the binding as the kernel applied it (sysfs, or attach's native check). */
export type BoundState = Pick<SysfsLoop, (typeof APPLIED)[number] | 'backingFile' | 'diskseq'>;

export interface DetachOptions {
  /** How long to wait for a release nothing could be blamed for (default 10000). */
  timeoutMs?: number;
  /** Do not wait: clear and close, the kernel detaches at the last close (`losetup -d`). */
  lazy?: boolean;
}

/** How often a waiting detach looks for what holds the device, and how long a process may keep it open. */
const LOOK_EVERY_MS = 50;
const PROCESS_GRACE_MS = 250;

function detachOptions(o: number | DetachOptions): Required<DetachOptions> {
  const { timeoutMs = DETACH_TIMEOUT_MS, lazy = false } = typeof o === 'number' ? { timeoutMs: o } : o;
  return { timeoutMs, lazy };
}

function nodeName(p: Partition): string {
  return p.node.slice(p.node.lastIndexOf('/') + 1);
}

function warnPartitions(message: string): void {
  process.emitWarning(message, { code: 'LOOPDEV_PARTITIONS' });
}

function notAttached(path: string) {
  return sysError('ENXIO', { syscall: 'ioctl', ioctl: 'LOOP_GET_STATUS64', path, detail: 'not attached' });
}

/** Verified detach of an already bound device by name or path (`loopdev detach`, `losetup -d`). */
export async function detach(device: string | number, options: number | DetachOptions = {}): Promise<void> {
  await LoopDevice.open(device).detach(options);
}

export function detachSync(device: string | number, options: number | DetachOptions = {}): void {
  LoopDevice.open(device).detachSync(options);
}
