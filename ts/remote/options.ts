/** What a `LoopServer` is configured with and what it reports (the binding passes these through). */

/** What one peer may take from the server. Requests over a limit get an exception reply (EDQUOT, ENOSPC). */
export interface LoopServerQuotas {
  /** Connections one uid may hold open (default 32); more are refused with EAGAIN at connect. */
  maxConnectionsPerUid?: number;
  /** Devices the server holds at once, all peers together (default 1024). */
  maxDevices?: number;
  /** Devices one uid may hold at once (default 64). */
  maxDevicesPerUid?: number;
  /** A connection that holds no device and sends nothing for this long is closed (default 600000; 0: never). */
  idleTimeoutMs?: number;
  /**
   * Worker threads that serve requests and release devices (default 8, started with the server; at least
   * 2: peers other than root always leave root one, so a peer whose files stall cannot take them all).
   */
  workers?: number;
  /**
   * Requests of one uid served at once (default 2), counting ones stuck past their deadline on a file that
   * does not answer, so one peer cannot take every worker; more wait for a place until their deadline.
   */
  maxRequestsPerUid?: number;
  /** A request not answered by then gets ETIMEDOUT (default 30000; 0: never). */
  requestTimeoutMs?: number;
}

export interface LoopServerOptions extends LoopServerQuotas {
  /**
   * Where to bind the AF_UNIX SOCK_SEQPACKET socket, removed again by `close()`. A stale socket there (its
   * server was killed) is replaced; a live one, or any other file, is EADDRINUSE. Not needed with `fd`.
   */
  socketPath?: string;
  /**
   * A listening SOCK_SEQPACKET socket to serve on instead of binding one (systemd socket activation: fd 3
   * with `LISTEN_FDS=1`). It stays the caller's, and its name is left alone by `close()`.
   */
  fd?: number;
  /**
   * Peer uids (checked with SO_PEERCRED at connect) that may request devices. Others get one exception
   * reply and are disconnected. Default: this process's effective uid and root.
   */
  allowUids?: readonly number[];
  /** One line per request on stderr: peer pid and uid, file, device or refusal, milliseconds (default false). */
  log?: boolean;
}

export interface LoopServerStats {
  /** The server thread is serving. */
  running: boolean;
  /** Open client connections. */
  connections: number;
  /** Devices attached and held open for connected clients (released when their connection closes). */
  devices: number;
  /** Messages received, well-formed or not. */
  requests: number;
  /** Exception replies sent. */
  failures: number;
  /** Connections refused because of their uid, or over the per-uid connection limit. */
  refused: number;
}
