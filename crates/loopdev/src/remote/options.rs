//! What a server is configured with, and its defaults: the workers and the attach steps read it too.

use super::jsoncomm::Limits;
use std::time::Duration;

/// Limits of what one request may carry: remoteloop requests are ~150 bytes with 2 fds.
pub const DEFAULT_LIMITS: Limits = Limits { max_packet: 64 << 10, max_payload: 1 << 20, max_fds: 2 };

/// Connections served at once; further clients wait in the listen backlog.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerOptions {
    /// Peers (by `SO_PEERCRED` uid, taken at connect) allowed to ask for devices. Default: our effective
    /// uid and root.
    pub allow_uids: Vec<u32>,
    pub limits: Limits,
    /// Connections served at once, all uids together.
    pub max_connections: usize,
    /// Connections one uid may hold open: one peer must not lock the others out (more get EAGAIN).
    pub max_connections_per_uid: usize,
    /// Devices the server holds at once, all uids together.
    pub max_devices: usize,
    /// Devices one uid may hold at once.
    pub max_devices_per_uid: usize,
    /// A connection that holds no device and sends nothing for this long is closed (None: never).
    pub idle_timeout: Option<Duration>,
    /// Worker threads serving requests, started with the server (any that cannot be, later on demand). Peers
    /// other than root always leave root one, so they are served only with 2 or more.
    pub workers: usize,
    /// Requests of one uid served at once, including ones stuck past their deadline, and releases of its
    /// devices (more wait for a place).
    pub max_requests_per_uid: usize,
    /// A request not answered by then gets ETIMEDOUT, and its device (if it comes) is released (None: never).
    pub request_timeout: Option<Duration>,
    /// Permissions of the device node made in the client's directory (osbuild: 0o600).
    pub node_mode: u32,
    /// One line per request on stderr: peer pid and uid, file, device or refusal, milliseconds.
    pub log: bool,
}

impl Default for ServerOptions {
    fn default() -> Self {
        let mut allow_uids = vec![nix::unistd::geteuid().as_raw(), 0];
        allow_uids.dedup();
        ServerOptions {
            allow_uids,
            limits: DEFAULT_LIMITS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_uid: 32,
            max_devices: 1024,
            max_devices_per_uid: 64,
            idle_timeout: Some(Duration::from_secs(600)),
            workers: 8,
            max_requests_per_uid: 2,
            request_timeout: Some(Duration::from_secs(30)),
            node_mode: 0o600,
            log: false,
        }
    }
}
