import { configureArgs, native, unwatch, watch, type Handle, type NativeLoop, type Watched } from './binding.js';
import { closedError } from './errors.js';
import { Loop, type ConfigureOptions, type LoopOptions } from './loop.js';
import { checkConfigure } from './options.js';

export interface LoopForFdOptions extends ConfigureOptions {
  /**
   * Take `flock(LOCK_EX)` on the device before binding, kept while it is open. Taken after loop-control's lock,
   * in systemd's order, and never waited for more than a few ms while holding it (so a systemd peer and this
   * call cannot deadlock): a free device another process keeps locked is skipped and a new one created.
   */
  lock?: boolean;
  /** Runs on the opened, still unbound device before it is configured. */
  setup?: (lo: Loop) => void;
}

/** `/dev/loop-control`: creates, removes and hands out loop devices. */
export class LoopControl implements Disposable {
  #handle: Handle | null;
  #watched: Watched;

  constructor(options: LoopOptions = {}) {
    this.#handle = native.controlOpen(options.dirFd);
    this.#watched = watch(this, this.#handle, 'loop-control');
  }

  get closed(): boolean {
    return this.#handle === null;
  }

  #h(): Handle {
    if (this.#handle === null) throw closedError('loop-control');
    return this.#handle;
  }

  close(): void {
    if (this.#handle === null) return;
    native.close(this.#handle);
    unwatch(this.#watched);
    this.#handle = null;
  }

  [Symbol.dispose](): void {
    this.close();
  }

  /** LOOP_CTL_ADD: creates `loop<minor>` (-1: the first free minor); returns the minor. */
  add(minor = -1): number {
    return native.controlAdd(this.#h(), minor);
  }

  /** LOOP_CTL_REMOVE (EBUSY while the device is bound or open). */
  remove(minor = -1): void {
    native.controlRemove(this.#h(), minor);
  }

  /** LOOP_CTL_GET_FREE: the minor of an unbound device, created if needed. */
  getUnbound(): number {
    return native.controlGetUnbound(this.#h());
  }

  /**
   * Binds `fd` to a free device and returns it open. Safe against other processes taking the same device
   * (retries on a fresh one), serialised across processes with flock on loop-control and across concurrent
   * calls on this LoopControl. The blocking part runs on the libuv pool; `setup` runs on the JS thread.
   */
  async loopForFd(fd: number, options: LoopForFdOptions = {}): Promise<Loop> {
    const raw = await native.controlLoopForFdAsync(
      this.#h(),
      fd,
      configureArgs(checkConfigure(options)),
      options?.lock,
      wrapSetup(options?.setup),
    );
    return new Loop(raw, true);
  }

  /** `loopForFd`, blocking the thread. */
  loopForFdSync(fd: number, options: LoopForFdOptions = {}): Loop {
    const o = configureArgs(checkConfigure(options));
    const raw = native.controlLoopForFd(this.#h(), fd, o, options?.lock, wrapSetup(options?.setup));
    return new Loop(raw, true);
  }
}

/** The callback sees a Loop on a temporary handle that is closed when it returns (here, so that the Loop is
 * not left watched for garbage collection). A non-function is passed on as is, for the native side to reject
 * with ERR_INVALID_ARG_TYPE. */
function wrapSetup(setup: unknown): ((raw: NativeLoop) => void) | undefined {
  if (typeof setup !== 'function') return setup as undefined;
  return (raw) => {
    const lo = new Loop(raw, false);
    try {
      setup(lo);
    } finally {
      lo.close();
    }
  };
}
