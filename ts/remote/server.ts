/**
 * `LoopServer`: osbuild's remoteloop server (wire-compatible with its `LoopClient`). The server runs on
 * native threads of its own (one answers, workers attach), so requests are served while JS is busy, a
 * configure waiting on the kernel never stalls the event loop, and a peer's file that never answers stalls
 * only that peer's request.
 */
import * as fs from 'node:fs';
import { native, type Handle } from '../binding.js';
import { closedError, LoopError } from '../errors.js';
import type { LoopServerOptions, LoopServerQuotas, LoopServerStats } from './options.js';

export type { LoopServerOptions, LoopServerQuotas, LoopServerStats };

/** The path a unix socket fd is bound to, from /proc/net/unix by its inode ('' when it has none). */
function boundName(fd: number): string {
  const inode = /^socket:\[(\d+)\]$/.exec(fs.readlinkSync(`/proc/self/fd/${fd}`))?.[1];
  const line = fs
    .readFileSync('/proc/net/unix', 'utf8')
    .split('\n')
    .find((l) => l.trim().split(/\s+/)[6] === inode);
  return line?.trim().split(/\s+/)[7] ?? '';
}

/** Never fires; keeps the process alive while the server listens, like a listening `net.Server`. */
const FOREVER_MS = 2 ** 31 - 1;

export class LoopServer implements AsyncDisposable {
  /** The socket's path (for `fd`, the name it is bound to, known once listening). */
  socketPath: string;
  readonly fd: number | undefined;
  readonly allowUids: readonly number[] | undefined;
  readonly quotas: Readonly<LoopServerQuotas>;
  readonly log: boolean;

  #handle: Handle | null = null;
  #closed: Promise<void> | null = null;
  #keepAlive: NodeJS.Timeout | null = null;
  #ref = true;

  constructor(options: LoopServerOptions) {
    const { fd } = options ?? {};
    if (fd !== undefined ? !Number.isInteger(fd) || fd < 0 : typeof options?.socketPath !== 'string' || options.socketPath === '') {
      throw new TypeError('LoopServer: socketPath must be a non-empty string (or fd a listening socket)');
    }
    this.socketPath = options.socketPath ?? '';
    this.fd = fd;
    this.allowUids = options.allowUids === undefined ? undefined : Object.freeze([...options.allowUids]);
    const { maxConnectionsPerUid, maxDevices, maxDevicesPerUid, idleTimeoutMs } = options;
    const { workers, maxRequestsPerUid, requestTimeoutMs } = options;
    this.log = options.log ?? false;
    this.quotas = Object.freeze({
      maxConnectionsPerUid,
      maxDevices,
      maxDevicesPerUid,
      idleTimeoutMs,
      workers,
      maxRequestsPerUid,
      requestTimeoutMs,
    });
  }

  get listening(): boolean {
    return this.#handle !== null && this.#closed === null;
  }

  /** Binds the socket and starts serving. Rejects with EADDRINUSE if the path exists. */
  async listen(): Promise<void> {
    if (this.#closed) throw closedError('loop server', this.socketPath);
    if (this.#handle) {
      throw new LoopError(`ERR_SERVER_ALREADY_LISTEN: the loop server already listens '${this.socketPath}'`, {
        code: 'ERR_SERVER_ALREADY_LISTEN',
        path: this.socketPath,
      });
    }
    const quotas = { ...this.quotas, log: this.log };
    if (this.fd === undefined) {
      this.#handle = native.remoteServerListen(this.socketPath, this.allowUids, quotas);
    } else {
      this.#handle = native.remoteServerAdopt(this.fd, this.allowUids, quotas);
      this.socketPath ||= boundName(this.fd);
    }
    // The callback holds `this`: a listening server is never garbage-collected (which would stop it).
    this.#keepAlive = setInterval(() => void this, FOREVER_MS);
    if (!this.#ref) this.#keepAlive.unref();
  }

  /** Counters of the server thread. */
  stats(): LoopServerStats {
    if (this.#handle === null || this.#closed) throw closedError('loop server', this.socketPath);
    return native.remoteServerStats(this.#handle);
  }

  /** Let the process exit even while the server listens (like `net.Server#unref`). */
  unref(): this {
    this.#ref = false;
    this.#keepAlive?.unref();
    return this;
  }

  ref(): this {
    this.#ref = true;
    this.#keepAlive?.ref();
    return this;
  }

  /**
   * Stops serving: closes the socket and every connection, removes the socket file, removes every node and
   * closes every device the server attached (autoclear then frees each one nobody else holds open).
   * Requests still being served are abandoned, not waited for. Rejects with ETIMEDOUT after a few seconds
   * if releasing is stuck on a peer's directory that never answers (the workers finish it when it does).
   * Idempotent.
   */
  close(): Promise<void> {
    if (!this.#closed) {
      const handle = this.#handle;
      if (this.#keepAlive) clearInterval(this.#keepAlive);
      this.#keepAlive = null;
      this.#closed = handle ? native.remoteServerClose(handle) : Promise.resolve();
    }
    return this.#closed;
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}
