/**
 * The native addon's functions as TypeScript sees them, loaded once (see load.ts), plus the collection of
 * handles whose owner forgot to close them.
 */
import { loadNative } from './load.js';
import { LoopError, UnexpectedDeviceError } from './errors.js';
import { readLoop } from './sysfs.js';
import type { LoopInfoFields } from './info.js';
import type { NativeTable } from './partitions.js';
import type { LoopServerQuotas, LoopServerStats } from './remote/options.js';

/** Opaque native object; only the functions below understand it. */
export type Handle = { readonly __native: unique symbol };

export interface NativeLoop {
  handle: Handle;
  minor: number;
  path: string;
  fd: number;
}

type Size = number | bigint;

export interface NativeConfigure {
  offset?: Size;
  sizeLimit?: Size;
  blockSize?: Size;
  autoclear?: boolean;
  partscan?: boolean;
  readOnly?: boolean;
  directIo?: boolean;
  fileName?: string;
}

/** What `attach` adds to the configure options. */
export interface NativeAttach extends NativeConfigure {
  /** flock(LOCK_EX) on the device while it is open. */
  lock?: boolean;
  /** The backing fd was opened for this attach: O_DIRECT may be cleared on it when direct I/O is refused. */
  ownsFd?: boolean;
}

/** The options record in the order the native side reads it (see `configureArgs`, and `attach_options` in
 * crates/loopdev-napi/src/convert.rs, the one place that converts it). */
export type ConfigureArgs = readonly [
  offset?: Size,
  sizeLimit?: Size,
  blockSize?: Size,
  autoclear?: boolean,
  partscan?: boolean,
  readOnly?: boolean,
  directIo?: boolean,
  fileName?: string,
  lock?: boolean,
  ownsFd?: boolean,
];

/**
 * The options record in the positional form the native side reads: looking named properties up through
 * N-API costs about as much as the rest of a bind's overhead together. Callers check values first
 * (`checkConfigure` in options.ts); the native side checks them again, for callers of the raw binding.
 */
export function configureArgs(o: NativeAttach | null | undefined): ConfigureArgs {
  if (o == null) return [];
  if (typeof o !== 'object') {
    throw Object.assign(new TypeError('options must be an object'), { code: 'ERR_INVALID_ARG_TYPE' });
  }
  const args: [...ConfigureArgs] = [
    o.offset,
    o.sizeLimit,
    o.blockSize,
    o.autoclear,
    o.partscan,
    o.readOnly,
    o.directIo,
    o.fileName,
    o.lock,
    o.ownsFd,
  ];
  // Trailing defaults left out: the native side reads only what is there (none at all for `{}`).
  let given = args.length;
  while (given > 0 && args[given - 1] === undefined) given--;
  args.length = given;
  return args;
}

/** What the kernel applied to a device `attach` bound, read back and verified natively. */
export interface NativeApplied {
  readOnly: boolean;
  directIo: boolean;
  partscan: boolean;
  autoclear: boolean;
  offset: bigint;
  sizeLimit: bigint;
  /** Device size in bytes. */
  size: bigint;
  /** Logical sector size in bytes. */
  blockSize: number;
  /** sysfs `loop/backing_file`. */
  backingFile: string;
  diskseq: bigint | null;
  /** `st_dev` / `st_ino` of the backing file the device is bound to. */
  device: bigint;
  inode: bigint;
}

export interface NativeAttached extends NativeLoop {
  applied: NativeApplied;
}

export interface NativeStatus {
  offset?: Size;
  sizeLimit?: Size;
  autoclear?: boolean;
  partscan?: boolean;
  readOnly?: boolean;
}

export interface Native {
  init(classes: { LoopError: typeof LoopError; UnexpectedDeviceError: typeof UnexpectedDeviceError }): void;
  /** Idempotent; true when this call closed the handle. */
  close(h: Handle): boolean;
  /** `close`, with the closing itself (a device's teardown, since Linux 6.11) on the pool. */
  closeAsync(h: Handle): Promise<boolean>;
  controlOpen(dirFd?: number): Handle;
  controlAdd(h: Handle, minor: number): number;
  controlRemove(h: Handle, minor: number): void;
  controlGetUnbound(h: Handle): number;
  controlLoopForFd(
    h: Handle,
    fd: number,
    o: ConfigureArgs,
    lock: boolean | undefined,
    setup?: (lo: NativeLoop) => void,
  ): NativeLoop;
  controlLoopForFdAsync(
    h: Handle,
    fd: number,
    o: ConfigureArgs,
    lock: boolean | undefined,
    setup?: (lo: NativeLoop) => void,
  ): Promise<NativeLoop>;
  /**
   * get-free → open → (lock) → configure → verify what the kernel applied → retry on a fresh device, with
   * the direct-I/O fallback (`LoopControl::attach` in crates/loopdev/src/attach.rs). Opens its own loop-control.
   */
  attach(fd: number, o: ConfigureArgs): NativeAttached;
  attachAsync(fd: number, o: ConfigureArgs): Promise<NativeAttached>;
  loopOpen(minor: number, dirFd?: number): NativeLoop;
  loopFlock(h: Handle, op: number): void;
  loopFlushBuf(h: Handle): void;
  loopSetFd(h: Handle, fd: number): void;
  loopClearFd(h: Handle): void;
  loopClearFdWait(h: Handle, fd: number, timeoutMs: number, waitMs: number): void;
  loopClearFdWaitAsync(h: Handle, fd: number, timeoutMs: number, waitMs: number): Promise<void>;
  loopDetach(h: Handle, timeoutMs: number, waitMs: number): void;
  loopDetachAsync(h: Handle, timeoutMs: number, waitMs: number): Promise<void>;
  /** Closes `h` for JS now; the verified detach and the close itself run on the pool. */
  loopDisposeAsync(h: Handle, timeoutMs: number, waitMs: number): Promise<void>;
  loopChangeFd(h: Handle, fd: number): void;
  loopIsBoundTo(h: Handle, fd: number): boolean;
  loopSetStatus(h: Handle, o: NativeStatus): void;
  loopGetStatus(h: Handle): LoopInfoFields;
  loopConfigure(h: Handle, fd: number, o: ConfigureArgs): void;
  loopConfigureAsync(h: Handle, fd: number, o: ConfigureArgs): Promise<void>;
  loopSetDirectIo(h: Handle, on: boolean): void;
  loopSetBlockSize(h: Handle, size: Size): void;
  loopSetCapacity(h: Handle): void;
  loopMknod(h: Handle, dirFd: number, mode: number): void;
  removeNode(dirFd: number, name: string): void;
  /** Processes with an fd open on one of `devs` (`major:minor`), from /proc, in pid order. */
  blockOpeners(devs: string[]): { pid: number; comm: string }[];
  blockOpenersAsync(devs: string[]): Promise<{ pid: number; comm: string }[]>;
  loopPartitionTable(h: Handle): NativeTable | null;
  /** BLKPG_ADD_PARTITION for each partition of the table the kernel lacks; `added` are ours to remove. */
  loopAddPartitions(h: Handle): { table: NativeTable | null; added: number[]; warnings: string[] };
  loopRemovePartition(h: Handle, number: number): void;
  remoteServerListen(socketPath: string, allowUids?: readonly number[], quotas?: LoopServerQuotas & { log?: boolean }): Handle;
  remoteServerAdopt(fd: number, allowUids?: readonly number[], quotas?: LoopServerQuotas & { log?: boolean }): Handle;
  remoteServerClose(h: Handle): Promise<void>;
  remoteServerStats(h: Handle): LoopServerStats;
  remoteClientConnect(socketPath: string): Handle;
  remoteClientRequest(
    h: Handle,
    /** A path (opened natively, read-write unless readOnly) or an fd (duplicated before the call returns). */
    file: string | number,
    dir: string | number,
    o: {
      offset?: Size;
      sizeLimit?: Size;
      lock?: boolean;
      partscan?: boolean;
      readOnly?: boolean;
      sectorSize?: Size;
      open?: boolean;
    },
    timeoutMs?: number,
  ): Promise<
    | { devname: string; fd?: number; exception?: undefined }
    | { devname?: undefined; fd?: number; exception: { type: string; value: string; traceback: string; errno?: number } }
  >;
  remoteClientCancel(h: Handle): void;
  remoteClientClose(h: Handle): void;
}

export const native: Native = loadNative<Native>();
native.init({ LoopError, UnexpectedDeviceError });

export interface Watched {
  handle: Handle;
  what: string;
  /** `loopN`, for a loop device: the warning then says what becomes of its binding. */
  devname?: string;
  /** Cleared by the owner's close(): the callback then has nothing to do, not even read sysfs. */
  open: boolean;
}

/**
 * Closes handles whose owner (a Loop or LoopControl) was garbage-collected without close(), and says so,
 * like Node does for a FileHandle, including what happens to the device: with autoclear that close is what
 * detaches it; without, it stays bound.
 */
const unclosed = new FinalizationRegistry<Watched>(({ handle, what, devname, open }) => {
  if (!open) return;
  // Read before the close: with autoclear, the close may be what unbinds it.
  const bound = devname === undefined ? null : readLoop(devname);
  if (!native.close(handle)) return;
  const fate =
    bound === null
      ? ''
      : bound.autoclear
        ? ` (autoclear: the kernel detaches it now, unless another process has it open)`
        : ` (it stays bound to ${bound.backingFile}: no autoclear; detach it to release it)`;
  process.emitWarning(`Closing ${what} on garbage collection${fate}; close it (or use \`using\`) when done`, {
    code: 'LOOPDEV_UNCLOSED',
  });
});

/** Owners watched in the last `REGISTER_AFTER_MS`, not registered yet; held strongly meanwhile. */
const young = new Map<Watched, object>();
const REGISTER_AFTER_MS = 100;
let registering: ReturnType<typeof setTimeout> | null = null;

/**
 * Watches `owner`: if it is collected while its handle is still open, the handle is closed with a warning.
 * Registered only if still open `REGISTER_AFTER_MS` later: registering every Loop at once made V8 grow its
 * young generation to the maximum (new space 4 → 32 MB, with or without unregistering at close), which was
 * the RSS growth of #10 (`bench/memory.ts --kind sync`, 100,000 cycles: +24 MB, +2 MB now). Until then
 * `young` holds the owner, so none is collected unregistered. The owner clears `open` when it closes
 * (`unwatch`); one closed after registration costs its callback a look at `open`.
 */
export function watch(owner: object, handle: Handle, what: string, devname?: string): Watched {
  const watched = { handle, what, devname, open: true };
  young.set(watched, owner);
  if (registering === null) {
    registering = setTimeout(registerYoung, REGISTER_AFTER_MS);
    unref(registering);
  }
  return watched;
}

/** The owner of `watched` closed its handle. */
export function unwatch(watched: Watched): void {
  watched.open = false;
  young.delete(watched);
}

/** The timer must not keep the process alive: node and bun return an object with `unref`, Deno a number. */
function unref(timer: ReturnType<typeof setTimeout>): void {
  const deno = (globalThis as { Deno?: { unrefTimer?: (id: number) => void } }).Deno;
  if (typeof timer === 'number') deno?.unrefTimer?.(timer);
  else (timer as { unref?: () => void }).unref?.();
}

function registerYoung(): void {
  registering = null;
  for (const [watched, owner] of young) unclosed.register(owner, watched);
  young.clear();
}
