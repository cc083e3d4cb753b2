/** `serve()`: run a LoopServer until a signal, then release everything (`loopdev serve --socket PATH`). */
import { LoopServer, type LoopServerOptions } from './server.js';

export interface ServeOptions extends LoopServerOptions {
  /** Signals that stop the server (default: SIGINT and SIGTERM). */
  signals?: readonly NodeJS.Signals[];
  /** Stops the server too when aborted. */
  signal?: AbortSignal;
  /** Called once the socket listens (e.g. to print where). */
  onListening?: (server: LoopServer) => void;
}

/**
 * Listens on `socketPath` and serves until one of `signals` arrives (or `signal` aborts), then closes the
 * server: the socket file is removed and every device it attached is released. Resolves with what stopped
 * it. The signal handlers are ours only while serving; default signal behaviour is restored afterwards.
 */
export async function serve(options: ServeOptions): Promise<NodeJS.Signals | 'abort'> {
  const { signals = ['SIGINT', 'SIGTERM'], signal, onListening, ...serverOptions } = options;
  if (signal?.aborted) return 'abort';
  const server = new LoopServer(serverOptions);
  let stop!: (why: NodeJS.Signals | 'abort') => void;
  const stopped = new Promise<NodeJS.Signals | 'abort'>((resolve) => (stop = resolve));
  const handlers = signals.map((sig) => [sig, () => stop(sig)] as const);
  const onAbort = (): void => stop('abort');
  // Ours before the socket listens: the native server answers as soon as it does, so a client may be done
  // and its supervisor send SIGTERM before the line after `listen()` runs.
  for (const [sig, handler] of handlers) process.on(sig, handler);
  signal?.addEventListener('abort', onAbort, { once: true });
  try {
    await server.listen();
    onListening?.(server);
    return await stopped;
  } finally {
    for (const [sig, handler] of handlers) process.off(sig, handler);
    signal?.removeEventListener('abort', onAbort);
    await server.close();
  }
}
