/**
 * One algorithm, two drivers: a flow is a generator that yields blocking steps; `runSync` runs each step's
 * sync twin, `runAsync` awaits its async twin. This keeps `attach`/`attachSync` (and the other twins) from
 * drifting apart.
 */

/** A step with a blocking and a non-blocking implementation. */
export interface Op<T> {
  sync(): T;
  async(): Promise<T>;
}

export type Flow<R> = Generator<Op<unknown>, R, unknown>;

/** `const x = yield* call(op)` inside a flow: runs `op` with the flow's driver and returns its result. */
export function* call<T>(op: Op<T>): Generator<Op<unknown>, T, unknown> {
  return (yield op as Op<unknown>) as T;
}

export function runSync<R>(flow: Flow<R>): R {
  let step = flow.next();
  for (;;) {
    if (step.done) return step.value;
    let value: unknown;
    try {
      value = step.value.sync();
    } catch (e) {
      step = flow.throw(e);
      continue;
    }
    step = flow.next(value);
  }
}

export async function runAsync<R>(flow: Flow<R>): Promise<R> {
  let step = flow.next();
  for (;;) {
    if (step.done) return step.value;
    let value: unknown;
    try {
      value = await step.value.async();
    } catch (e) {
      step = flow.throw(e);
      continue;
    }
    step = flow.next(value);
  }
}

const sleeper = new Int32Array(new SharedArrayBuffer(4));

/** Blocks the thread for `ms` (no busy loop). */
export function sleepSync(ms: number): void {
  Atomics.wait(sleeper, 0, 0, ms);
}

export function sleep(ms: number): Op<void> {
  return {
    sync: () => sleepSync(ms),
    async: () => new Promise((resolve) => setTimeout(resolve, ms)),
  };
}
