import { configureArgs, native, watch, type Handle, type NativeLoop } from './binding.js';
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

const kNative = Symbol('loopdev.native');

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

  /**
   * Opens `<dir>/loop<minor>` read-write; throws UnexpectedDeviceError unless it is the block device sysfs names
   * for `loop<minor>` (7:minor, or 7:(minor << part_shift) when the loop module has `max_part` set).
   */
  constructor(minor: number, options: LoopOptions = {}) {
    const raw: NativeLoop =
      (options as { [kNative]?: NativeLoop })[kNative] ?? native.loopOpen(minor, options.dirFd);
    this.minor = raw.minor;
    this.devname = `loop${raw.minor}`;
    this.path = raw.path;
    this.#handle = raw.handle;
    this.#fd = raw.fd;
    watch(this, raw.handle, `loop device ${raw.path}`, this.devname);
  }

  /** Wraps a device the native layer opened (and, when `bound`, configured) for us. */
  static fromNative(raw: NativeLoop, bound: boolean): Loop {
    const lo = new Loop(raw.minor, { [kNative]: raw } as LoopOptions);
    lo.#bound = bound;
    return lo;
  }

  /** For subclasses (`LoopDevice`): constructor options that adopt a device the native layer already opened. */
  protected static adoptOptions(raw: NativeLoop): LoopOptions {
    return { [kNative]: raw } as LoopOptions;
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

  /** For subclasses: the native handle (ERR_LOOP_CLOSED once closed). */
  protected get nativeHandle(): Handle {
    return this.#h();
  }

  /** Closes the device fd (idempotent). An autoclear device is detached by the kernel at its last close. */
  close(): void {
    if (this.#handle === null) return;
    native.close(this.#handle);
    this.#handle = null;
    this.#fd = -1;
    this.#bound = false;
    this.onClose?.(this);
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
   * Verified detach of `fd`'s file: if the device is bound to it (dev/ino), LOOP_CLR_FD, then wait until it no
   * longer is. A device unbound or bound to another file is left alone (resolves): it is checked first.
   *
   * Resolving means: after the clear, the kernel reported the device unbound or being torn down, which it
   * allows only while this is the device's only open. It does not mean the file is released yet: on
   * Linux ≥ 6.11 that happens at the last close of this Loop's fd (`close()`), before that at once.
   * While another process holds the device open the clear only sets autoclear; on timeout it rejects with
   * ETIMEDOUT, the device still bound, and the message says whether this call set autoclear (the kernel then
   * detaches the device at its last close).
   */
  async clearFdWait(fd: number, timeoutMs: number, waitMs = 100): Promise<void> {
    await native.loopClearFdWaitAsync(this.#h(), fd, timeoutMs, waitMs);
    this.#bound = false;
  }

  clearFdWaitSync(fd: number, timeoutMs: number, waitMs = 100): void {
    native.loopClearFdWait(this.#h(), fd, timeoutMs, waitMs);
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

  /** Verified detach of whatever is bound now (clear + wait until the kernel let go), then stays open. */
  detachSync(timeoutMs = DETACH_TIMEOUT_MS): void {
    native.loopDetach(this.#h(), timeoutMs, POLL_MS);
    this.#bound = false;
  }

  async detach(timeoutMs = DETACH_TIMEOUT_MS): Promise<void> {
    await native.loopDetachAsync(this.#h(), timeoutMs, POLL_MS);
    this.#bound = false;
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
    try {
      if (this.#bound && this.#handle !== null) await this.detach();
    } finally {
      this.close();
    }
  }
}

/** Removes a node made by `Loop.mknod` (unmounting the bind mount first when there is one). */
export function removeNode(dirFd: number, name: string): void {
  native.removeNode(dirFd, name);
}
