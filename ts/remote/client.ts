/**
 * `LoopClient`: osbuild's remoteloop client. Asks a `LoopServer` (ours or osbuild's) for a loop device
 * bound to a file, with its node created in a directory of ours (default `/dev`).
 */
import * as fs from 'node:fs';
import { constants as osConstants } from 'node:os';
import { join, resolve } from 'node:path';
import { native, type Handle } from '../binding.js';
import { closedError, LoopError } from '../errors.js';
import { removeNode } from '../loop.js';
import { sysError } from '../syserr.js';

type Size = number | bigint;

export interface RemoteDeviceOptions {
  /** Start of the device in the file, bytes (0 = start). */
  offset?: Size;
  /** Size of the device, bytes (0 = up to the end of the file). */
  sizeLimit?: Size;
  /** Server takes `flock(LOCK_EX)` on the device (keeps udev away) for as long as it holds it. */
  lock?: boolean;
  partscan?: boolean;
  /** Read-only device; the file is opened O_RDONLY. */
  readOnly?: boolean;
  /** Logical sector size (default 512). */
  sectorSize?: number;
  /** Directory the server creates the `loopN` node in (default `/dev`). */
  devDir?: string;
  /**
   * Also get an open fd of the device (`RemoteDevice.fd`, O_RDWR unless the binding is read-only), from our
   * server (osbuild's ignores this), for root clients only: any fd of a loop device lets its holder rebind
   * it (LOOP_CHANGE_FD), so a non-root client gets EPERM. While the fd is open the device stays bound to the
   * file, even after the connection closes.
   */
  open?: boolean;
  /**
   * Gives up after this long (default 60000; 0: never), counted from the call, including the wait behind
   * this client's earlier requests: rejects with ETIMEDOUT.
   */
  timeoutMs?: number;
  /** Gives up when aborted: rejects with an `AbortError` (code `ABORT_ERR`). */
  signal?: AbortSignal;
}

export const DEFAULT_REQUEST_TIMEOUT_MS = 60_000;

/** Node's own shape for an aborted operation (`code: 'ABORT_ERR'`, `cause`: the signal's reason). */
function abortError(signal: AbortSignal): Error {
  return Object.assign(new Error('The operation was aborted', { cause: signal.reason }), {
    name: 'AbortError',
    code: 'ABORT_ERR',
  });
}

function deadlineOf(timeoutMs: number | undefined): number {
  const ms = timeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS;
  if (!Number.isInteger(ms) || ms < 0 || ms > 2 ** 32 - 1) {
    throw Object.assign(new RangeError(`The value of "timeoutMs" is out of range. Received ${ms}`), {
      code: 'ERR_OUT_OF_RANGE',
    });
  }
  return ms === 0 ? Infinity : Date.now() + ms;
}

/** An exception reply of the server (`{"method": "exception", …}`), as a LoopError. */
export class RemoteLoopError extends LoopError {
  /** Python exception type name the server reported (`OSError`, …). */
  readonly remoteType: string;
  readonly remoteValue: string;
  readonly remoteTraceback: string;

  constructor(
    socketPath: string,
    exception: { type: string; value: string; traceback: string; errno?: number | undefined },
    hint?: string,
  ) {
    const code = exception.errno === undefined ? undefined : errnoName(exception.errno);
    const message = `${code ?? 'ERR_LOOP_REMOTE'}: loop server '${socketPath}': ${exception.type}: ${exception.value}`;
    super(hint ? `${message} (${hint})` : message, {
      code: code ?? 'ERR_LOOP_REMOTE',
      ...(code === undefined || exception.errno === undefined ? {} : { errno: -exception.errno }),
      syscall: 'remoteloop',
      path: socketPath,
    });
    this.remoteType = exception.type;
    this.remoteValue = exception.value;
    this.remoteTraceback = exception.traceback;
  }
}

/** What a known failure usually means, for the error message. */
function hintFor(exception: { errno?: number | undefined }, devDir: string): string | undefined {
  if (exception.errno === osConstants.errno.EEXIST && resolve(devDir) === '/dev') {
    return "devDir '/dev' has that node already: a server in this mount namespace sees the host's /dev; pass a directory of your own as devDir";
  }
  return undefined;
}

function errnoName(errno: number): string | undefined {
  for (const [name, n] of Object.entries(osConstants.errno)) if (n === errno) return name;
  return undefined;
}

/** A device node the server made for us. Disposing it removes the node (the device stays the server's);
 * a non-root client's node (`loopN.d/loopN`) only the server removes, with the connection. */
export class RemoteDevice implements AsyncDisposable {
  /** `loopN`; `loopN.d/loopN` for a non-root client (the node is in a directory of root's in `devDir`, so
   * that it cannot be moved out of `devDir`). */
  readonly devname: string;
  /** The directory the client asked for the node in. */
  readonly devDir: string;
  /** `<devDir>/<devname>`. */
  readonly path: string;
  #removed = false;
  #fd: number;

  constructor(devDir: string, devname: string, fd = -1) {
    this.devDir = devDir;
    this.devname = devname;
    this.path = join(devDir, devname);
    this.#fd = fd;
  }

  /** The open fd of the device the server sent (option `open`); -1 without one, or once removed. */
  get fd(): number {
    return this.#fd;
  }

  get removed(): boolean {
    return this.#removed;
  }

  /**
   * Closes the fd (option `open`) and removes the node (unmounting it first when the server bind-mounted the
   * host's node), like osbuild's context manager. Idempotent; a node already gone is fine. The device itself
   * is released by the server when the connection closes. A non-root client cannot remove a bind-mounted
   * node (EPERM/EBUSY), nor anything in root's directory `loopN.d`: the server does, with the connection.
   */
  removeSync(): void {
    if (this.#fd >= 0) {
      const fd = this.#fd;
      this.#fd = -1;
      fs.closeSync(fd);
    }
    if (this.#removed) return;
    if (this.devname.includes('/')) {
      this.#removed = true;
      return;
    }
    const dirFd = fs.openSync(this.devDir, fs.constants.O_RDONLY | fs.constants.O_DIRECTORY);
    try {
      removeNode(dirFd, this.devname);
    } catch (e) {
      const code = (e as { code?: string }).code;
      // A non-root client cannot undo the server's bind mount: the server does, when the connection closes.
      const leftToServer = (code === 'EPERM' || code === 'EBUSY') && process.getuid?.() !== 0;
      if (code !== 'ENOENT' && !leftToServer) throw e;
    } finally {
      fs.closeSync(dirFd);
    }
    this.#removed = true;
  }

  async remove(): Promise<void> {
    this.removeSync();
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.remove();
  }
}

export class LoopClient implements Disposable {
  readonly socketPath: string;
  #handle: Handle | null;
  /** One request at a time (replies carry no id): settles when every request made so far is done. */
  #queue: Promise<unknown> = Promise.resolve();
  /** Requests made and not settled yet: with none, a request skips the queue (and its timer). */
  #pending = 0;

  /** Connects (autobound SOCK_SEQPACKET) to the server at `socketPath`. */
  constructor(socketPath: string) {
    this.socketPath = socketPath;
    this.#handle = native.remoteClientConnect(socketPath);
  }

  get closed(): boolean {
    return this.#handle === null;
  }

  #h(): Handle {
    if (this.#handle === null) throw closedError('loop client', this.socketPath);
    return this.#handle;
  }

  /**
   * Asks the server for a loop device bound to `file` (a path, or an open fd that stays yours), with its node
   * created in `devDir`. Rejects with `RemoteLoopError` when the server answers with an exception, ETIMEDOUT
   * after `timeoutMs`, an AbortError when `signal` aborts. Waiting for the server takes no libuv pool thread.
   * A request given up on while the server works on it is answered later; that reply is discarded and the
   * node it names removed (the device stays with this connection until it closes).
   */
  device(file: string | number, options: RemoteDeviceOptions = {}): Promise<RemoteDevice> {
    const handle = this.#h();
    const deadline = deadlineOf(options.timeoutMs);
    const { signal } = options;
    if (signal?.aborted) return Promise.reject(abortError(signal));
    const turn = this.#queue;
    const run =
      this.#pending === 0
        ? this.#request(handle, file, options, deadline)
        : this.#waitTurn(turn, deadline, signal).then(() => this.#request(handle, file, options, deadline));
    this.#pending++;
    const settled = run.then(
      () => void this.#pending--,
      () => void this.#pending--,
    );
    // The next request waits for this one and for the one before (still in flight if this one gave up).
    this.#queue = this.#pending === 1 ? settled : Promise.all([turn, settled]);
    return run;
  }

  /** Until the earlier requests are done, unless the deadline passes or the signal aborts first. */
  #waitTurn(turn: Promise<unknown>, deadline: number, signal: AbortSignal | undefined): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const timer =
        deadline === Infinity
          ? undefined
          : setTimeout(() => finish(this.#timedOut('while queued behind earlier requests')), deadline - Date.now());
      const onAbort = () => finish(abortError(signal!));
      signal?.addEventListener('abort', onAbort, { once: true });
      const finish = (e?: Error) => {
        clearTimeout(timer);
        signal?.removeEventListener('abort', onAbort);
        if (e) reject(e);
        else resolve();
      };
      void turn.then(() => finish());
    }).then(() => {
      // The turn and a deadline or abort can land in the same tick: never send a request already given up.
      if (signal?.aborted) throw abortError(signal);
      if (Date.now() >= deadline) throw this.#timedOut('while queued behind earlier requests');
    });
  }

  #timedOut(detail: string): LoopError {
    return sysError('ETIMEDOUT', { syscall: 'remoteloop', path: this.socketPath, detail: `no reply ${detail}` });
  }

  async #request(handle: Handle, file: string | number, o: RemoteDeviceOptions, deadline: number): Promise<RemoteDevice> {
    const devDir = o.devDir ?? '/dev';
    const { signal } = o;
    const cancel = () => native.remoteClientCancel(handle);
    try {
      if (signal?.aborted) throw abortError(signal);
      const left = deadline === Infinity ? undefined : Math.max(1, deadline - Date.now());
      // Paths are opened (read-write unless readOnly) and closed on the request's own thread.
      const pending = native.remoteClientRequest(
        handle,
        file,
        devDir,
        {
          offset: o.offset,
          sizeLimit: o.sizeLimit,
          lock: o.lock,
          partscan: o.partscan,
          readOnly: o.readOnly,
          sectorSize: o.sectorSize,
          open: o.open,
        },
        left,
      );
      signal?.addEventListener('abort', cancel, { once: true });
      const reply = await pending.catch((e: unknown) => {
        throw (e as { code?: string }).code === 'ECANCELED' && signal?.aborted ? abortError(signal) : e;
      });
      if (reply.exception) throw new RemoteLoopError(this.socketPath, reply.exception, hintFor(reply.exception, devDir));
      return new RemoteDevice(devDir, reply.devname, reply.fd);
    } finally {
      signal?.removeEventListener('abort', cancel);
    }
  }

  /** Closes the connection; a request still waiting for its reply fails. Idempotent. */
  close(): void {
    if (this.#handle === null) return;
    native.remoteClientClose(this.#handle);
    this.#handle = null;
  }

  [Symbol.dispose](): void {
    this.close();
  }
}
