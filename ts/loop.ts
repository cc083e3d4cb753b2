import { configureArgs, native, unwatch, watch, type Handle, type NativeLoop, type Watched } from './binding.js';
import { checkConfigure } from './options.js';
import { closedError } from './errors.js';
import { LoopInfo } from './info.js';

type Size = number | bigint;

export interface LoopOptions {
  /** Directory holding the `loopN` node (default: `/dev`). */
  dirFd?: number;
}

export interface StatusOptions {
  offset?: Size;
  sizeLimit?: Size;
  autoclear?: boolean;
  partscan?: boolean;
  readOnly?: boolean;
}

export interface ConfigureOptions extends StatusOptions {
  /** Logical sector size in bytes (512…page size, a power of two). */
  blockSize?: Size;
  directIo?: boolean;
  /** Recorded as `lo_file_name` (`getStatus().fileName`, 63 bytes at most); empty unless given. */
  fileName?: string;
}

/** How long dispose/detach wait for the kernel to let go of the backing file. */
export const DETACH_TIMEOUT_MS = 10_000;
const POLL_MS = 10;

/** Options of `clearFdWait()` without an fd: verified clear of whatever is bound now. */
export interface ClearFdWaitOptions {
  /** How long to wait for the kernel to let go (default `DETACH_TIMEOUT_MS`). */
  timeoutMs?: number;
  /** How often to look again, in ms (default 10). */
  waitMs?: number;
}

/**
 * The native handle of `lo` (ERR_LOOP_CLOSED once closed), for the modules that add native calls on top of a
 * Loop (`LoopDevice`'s partition calls). Not exported from the package.
 */
export let handleOf: (lo: Loop) => Handle;

/**
 * `lo.close()` with the closing itself on the pool: since Linux 6.11 the last close of a device runs its
 * teardown (flushing its dirty page cache to the backing file first). Not exported from the package.
 */
export let closeOffThread: (lo: Loop) => Promise<void>;

/** An open loop block device (`/dev/loopN`). */
export class Loop implements Disposable, AsyncDisposable {
  readonly minor: number;
  readonly devname: string;
  readonly path: string;
  /** Called once by `close()`. */
  onClose?: (lo: Loop) => void;

  #handle: Handle | null;
  #fd: number;
  /** True while the device is bound by a call on this object, so dispose knows to detach it. */
  #bound = false;
  #watched: Watched;

  /**
   * Opens `<dir>/loop<minor>` read-write; throws UnexpectedDeviceError unless it is the block device sysfs names
   * for `loop<minor>` (7:minor, or 7:(minor << part_shift) when the loop module has `max_part` set).
   */
  constructor(minor: number, options?: LoopOptions);
  /**
   * @internal Adopts a device the native layer opened (`LoopControl.loopForFd`, `attach()`); `bound`: this
   * object configured it, so `[Symbol.dispose]` clears it.
   */
  constructor(raw: NativeLoop, bound: boolean);
  constructor(minorOrRaw: number | NativeLoop, options: LoopOptions | boolean = {}) {
    let raw: NativeLoop;
    if (typeof options === 'boolean') {
      raw = minorOrRaw as NativeLoop;
      this.#bound = options;
    } else {
      raw = native.loopOpen(minorOrRaw as number, options.dirFd);
    }
    this.minor = raw.minor;
    this.devname = `loop${raw.minor}`;
    this.path = raw.path;
    this.#handle = raw.handle;
    this.#fd = raw.fd;
    this.#watched = watch(this, raw.handle, `loop device ${raw.path}`, this.devname);
  }

  /** The device's file descriptor; -1 once closed. */
  get fd(): number {
    return this.#fd;
  }

  get closed(): boolean {
    return this.#handle === null;
  }

  #h(): Handle {
    if (this.#handle === null) throw closedError('loop device', this.path);
    return this.#handle;
  }

  static {
    handleOf = (lo) => lo.#h();
    closeOffThread = async (lo) => {
      await lo.#close(native.closeAsync);
    };
  }

  /** Closes the device fd (idempotent). An autoclear device is detached by the kernel at its last close. */
  close(): void {
    this.#close(native.close);
  }

  #close<R>(closeHandle: (h: Handle) => R): R | undefined {
    if (this.#handle === null) return undefined;
    const closed = closeHandle(this.#handle);
    unwatch(this.#watched);
    this.#handle = null;
    this.#fd = -1;
    this.#bound = false;
    this.onClose?.(this);
    return closed;
  }

  /** flock(2): `LOCK_SH`/`LOCK_EX`, `| LOCK_NB`, or `LOCK_UN`. */
  flock(op: number): void {
    native.loopFlock(this.#h(), op);
  }

  /** BLKFLSBUF: drop the device's buffer cache. */
  flushBuf(): void {
    native.loopFlushBuf(this.#h());
  }

  /** LOOP_SET_FD (deprecated: prefer `configure`). */
  setFd(fd: number): void {
    native.loopSetFd(this.#h(), fd);
    this.#bound = true;
  }

  /** LOOP_CLR_FD. The kernel finishes the detach at the last close of the device. */
  clearFd(): void {
    native.loopClearFd(this.#h());
    this.#bound = false;
  }

  /**
   * Verified clear: LOOP_CLR_FD, then wait until the kernel reports the device unbound (or bound anew).
   * `clearFdWait(fd, timeoutMs, waitMs = 100)` clears only a device bound to `fd`'s file (dev/ino): one
   * unbound or bound to another file is left alone (resolves). `clearFdWait({ timeoutMs, waitMs })` clears
   * whatever is bound now. The device stays open either way (`LoopDevice.detach` is the one that closes).
   *
   * Resolving means: after the clear, the kernel reported the device unbound or being torn down, which it
   * allows only while this is the device's only open. It does not mean the file is released yet: on
   * Linux ≥ 6.11 that happens at the last close of this Loop's fd (`close()`), before that at once.
   * While another process holds the device open the clear only sets autoclear; on timeout it rejects with
   * ETIMEDOUT, the device still bound, and the message says whether this call set autoclear (the kernel then
   * detaches the device at its last close).
   */
  clearFdWait(fd: number, timeoutMs: number, waitMs?: number): Promise<void>;
  clearFdWait(options?: ClearFdWaitOptions): Promise<void>;
  async clearFdWait(fd?: number | ClearFdWaitOptions, timeoutMs?: number, waitMs = 100): Promise<void> {
    if (!isOptions(fd)) {
      await native.loopClearFdWaitAsync(this.#h(), fd as number, timeoutMs as number, waitMs);
    } else {
      const o = clearOptions(fd);
      await native.loopDetachAsync(this.#h(), o.timeoutMs, o.waitMs);
    }
    this.#bound = false;
  }

  /** `clearFdWait`, blocking the thread. */
  clearFdWaitSync(fd: number, timeoutMs: number, waitMs?: number): void;
  clearFdWaitSync(options?: ClearFdWaitOptions): void;
  clearFdWaitSync(fd?: number | ClearFdWaitOptions, timeoutMs?: number, waitMs = 100): void {
    if (!isOptions(fd)) {
      native.loopClearFdWait(this.#h(), fd as number, timeoutMs as number, waitMs);
    } else {
      const o = clearOptions(fd);
      native.loopDetach(this.#h(), o.timeoutMs, o.waitMs);
    }
    this.#bound = false;
  }

  /** LOOP_CHANGE_FD: swap the backing file of a read-only device for one of the same size. */
  changeFd(fd: number): void {
    native.loopChangeFd(this.#h(), fd);
  }

  /** Whether the device is bound to the inode behind `fd` (false when unbound). */
  isBoundTo(fd: number): boolean {
    return native.loopIsBoundTo(this.#h(), fd);
  }

  /**
   * LOOP_SET_STATUS64 as read-modify-write. The kernel ignores, on a bound device, a change of `readOnly`
   * (it follows the backing fd's open mode) and `partscan: false`, after applying the rest: such a request
   * throws EINVAL before anything is changed.
   */
  setStatus(options: StatusOptions): void {
    native.loopSetStatus(this.#h(), options);
  }

  /** LOOP_GET_STATUS64; ENXIO when unbound. */
  getStatus(): LoopInfo {
    return new LoopInfo(native.loopGetStatus(this.#h()));
  }

  /**
   * Binds `fd` with LOOP_CONFIGURE (falls back to LOOP_SET_FD + LOOP_SET_STATUS64 on old kernels), off the
   * event loop.
   */
  async configure(fd: number, options: ConfigureOptions = {}): Promise<void> {
    await native.loopConfigureAsync(this.#h(), fd, configureArgs(checkConfigure(options)));
    this.#bound = true;
  }

  /** `configure`, blocking the thread. */
  configureSync(fd: number, options: ConfigureOptions = {}): void {
    native.loopConfigure(this.#h(), fd, configureArgs(checkConfigure(options)));
    this.#bound = true;
  }

  setDirectIo(on = true): void {
    native.loopSetDirectIo(this.#h(), on);
  }

  setBlockSize(size: Size): void {
    native.loopSetBlockSize(this.#h(), size);
  }

  /** LOOP_SET_CAPACITY: pick up a grown or shrunk backing file. */
  setCapacity(): void {
    native.loopSetCapacity(this.#h());
  }

  /**
   * Makes `loopN` usable in `dirFd` (a container's /dev): bind-mounts the host node when there is one,
   * else mknod S_IFBLK with the device's own number (from sysfs). Remove it with `removeNode(dirFd, lo.devname)`.
   */
  mknod(dirFd: number, mode = 0o600): void {
    native.loopMknod(this.#h(), dirFd, mode);
  }

  /** Detaches the device if this object bound it, then closes. Never throws for an already-gone device. */
  [Symbol.dispose](): void {
    try {
      if (this.#bound && this.#handle !== null) native.loopClearFd(this.#handle);
    } catch (e) {
      if ((e as { code?: string }).code !== 'ENXIO') throw e;
    } finally {
      this.close();
    }
  }

  /** Like `[Symbol.dispose]`, but waits until the kernel has really released the backing file. */
  async [Symbol.asyncDispose](): Promise<void> {
    if (!this.#bound) return closeOffThread(this);
    // One trip to the pool for the verified detach and the close after it.
    const { timeoutMs, waitMs } = clearOptions({});
    await this.#close((h) => native.loopDisposeAsync(h, timeoutMs, waitMs));
  }
}

/** The options form of `clearFdWait`; anything else is an fd, checked natively. */
function isOptions(x: unknown): x is ClearFdWaitOptions | undefined {
  return x === undefined || (typeof x === 'object' && x !== null);
}

function clearOptions(o: ClearFdWaitOptions | undefined): Required<ClearFdWaitOptions> {
  const { timeoutMs = DETACH_TIMEOUT_MS, waitMs = POLL_MS } = o ?? {};
  return { timeoutMs, waitMs };
}

/** Removes a node made by `Loop.mknod` (unmounting the bind mount first when there is one). */
export function removeNode(dirFd: number, name: string): void {
  native.removeNode(dirFd, name);
}
