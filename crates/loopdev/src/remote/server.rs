//! The remote loop server, wire-compatible with osbuild's `LoopServer`.
//!
//! One thread per server owns everything: the listening socket, the connections, the `LoopControl` and
//! every `Loop` it attached. It waits in poll(2) on the listener, the connections and an eventfd that
//! `Server::shutdown` signals, and serves each request to the end before looking at the next one, so a
//! configure that waits on the kernel only ever stalls this thread. Requests: receive (every fd owned at
//! once) → check peer, framing, JSON, fd indices, and what the peer's fds allow (`untrusted`) → quotas →
//! `loop_for_fd(autoclear)` → `mknod` into the client's directory → reply.
//!
//! A device lives as long as the connection that asked for it: when the client hangs up (or dies), its
//! nodes are removed and its devices closed, and autoclear frees each one nobody else holds open. osbuild's
//! server keeps them until it exits instead; its clients use a device only while connected, so they see
//! no difference, and a long-running server does not pin one device per request.

use super::jsoncomm::{self, Incoming, Limits, Message};
use super::seqpacket::{self, PeerCred};
use super::untrusted;
use super::wire::{Exception, Reply, Request, WireError};
use crate::control::LoopControl;
use crate::device::{open_in, Loop};
use crate::error::{Error, Result};
use crate::node::Node;
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};
use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::os::unix::io::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Limits of what one request may carry: remoteloop requests are ~150 bytes with 2 fds.
pub const DEFAULT_LIMITS: Limits = Limits { max_packet: 64 << 10, max_payload: 1 << 20, max_fds: 2 };

/// Connections served at once; further clients wait in the listen backlog.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;

const BACKLOG: usize = 128;

/// A refused peer may keep its connection this long for its first request, so that it reads our refusal
/// instead of EPIPE (osbuild's client connects, then opens its files, then sends)…
const REFUSAL_GRACE: Duration = Duration::from_secs(2);
/// …but no more than this many at once: refused peers must not take slots from allowed ones.
const MAX_REFUSING: usize = 16;

/// How long `shutdown` waits for the server thread before leaving it behind (a request stuck on a peer's
/// file that never answers, e.g. a FUSE mount whose daemon stopped, must not hang the caller).
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

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
    /// Permissions of the device node made in the client's directory (osbuild: 0o600).
    pub node_mode: u32,
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
            node_mode: 0o600,
        }
    }
}

/// Counters the server thread keeps; read them with `Server::stats`.
#[derive(Debug, Default)]
struct Counters {
    running: AtomicBool,
    connections: AtomicUsize,
    devices: AtomicUsize,
    requests: AtomicU64,
    failures: AtomicU64,
    refused: AtomicU64,
    /// Devices (pinned or waiting for their reply) per peer uid, for the per-uid quota.
    by_uid: Mutex<HashMap<u32, usize>>,
}

impl Counters {
    fn by_uid(&self) -> std::sync::MutexGuard<'_, HashMap<u32, usize>> {
        self.by_uid.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn devices_of(&self, uid: u32) -> usize {
        self.by_uid().get(&uid).copied().unwrap_or(0)
    }

    fn device_added(&self, uid: u32) {
        *self.by_uid().entry(uid).or_insert(0) += 1;
        self.devices.fetch_add(1, Ordering::SeqCst);
    }

    fn device_released(&self, uid: u32) {
        let mut map = self.by_uid();
        if let Some(n) = map.get_mut(&uid) {
            *n -= 1;
            if *n == 0 {
                map.remove(&uid);
            }
        }
        self.devices.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// The thread is serving (false after shutdown, or if it stopped on an unexpected error).
    pub running: bool,
    /// Open client connections.
    pub connections: usize,
    /// Devices attached and held open for connected clients.
    pub devices: usize,
    /// Messages received (well-formed or not).
    pub requests: u64,
    /// Exception replies sent.
    pub failures: u64,
    /// Connections turned away because of their peer uid or the per-uid connection limit.
    pub refused: u64,
}

/// A running server. Dropping it shuts it down too.
#[derive(Debug)]
pub struct Server {
    path: PathBuf,
    wake: Arc<OwnedFd>,
    counters: Arc<Counters>,
    /// Receives the thread's result when it ends.
    done: Option<mpsc::Receiver<Result<()>>>,
}

impl Server {
    /// Binds and listens on `path` (which must not exist), then serves on a new thread.
    pub fn bind(path: &Path, options: ServerOptions) -> Result<Server> {
        let listener = seqpacket::socket(true)?;
        let file = SocketFile::bind(listener.as_fd(), path)?;
        seqpacket::listen(listener.as_fd(), BACKLOG).map_err(|e| e.with_path(path))?;
        let wake = Arc::new(seqpacket::eventfd()?);
        let counters = Arc::new(Counters::default());
        counters.running.store(true, Ordering::SeqCst);
        let serve = Serve {
            socket_file: file,
            listener,
            spare: spare_fd(),
            wake: Arc::clone(&wake),
            conns: Vec::new(),
            attacher: Attacher { ctl: None, options, counters: Arc::clone(&counters) },
        };
        let (tx, done) = mpsc::channel();
        std::thread::Builder::new()
            .name("loopdev-server".into())
            .spawn(move || {
                let _ = tx.send(serve.run());
            })
            .map_err(|e| Error::os(Errno::from_i32(e.raw_os_error().unwrap_or(libc::EAGAIN)), "clone"))?;
        Ok(Server { path: path.to_path_buf(), wake, counters, done: Some(done) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        Stats {
            running: c.running.load(Ordering::SeqCst),
            connections: c.connections.load(Ordering::SeqCst),
            devices: c.devices.load(Ordering::SeqCst),
            requests: c.requests.load(Ordering::SeqCst),
            failures: c.failures.load(Ordering::SeqCst),
            refused: c.refused.load(Ordering::SeqCst),
        }
    }

    /// Stops serving: closes the listener and every connection, removes the socket file, removes every node
    /// and closes every device (autoclear detaches each one no one else has open). Returns when the thread
    /// is done, or with ETIMEDOUT after a few seconds if a request is stuck (the thread then finishes, and
    /// releases everything, whenever the request returns). An error the thread stopped on is returned here.
    pub fn shutdown(mut self) -> Result<()> {
        self.stop()
    }

    fn stop(&mut self) -> Result<()> {
        let done = match self.done.take() {
            Some(d) => d,
            None => return Ok(()),
        };
        // An eventfd counter cannot overflow from one write; if it failed the thread is gone already.
        let _ = seqpacket::eventfd_signal(self.wake.as_fd());
        match done.recv_timeout(SHUTDOWN_WAIT) {
            Ok(result) => result,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(Error::os(Errno::ETIMEDOUT, "shutdown")
                .with_path(&self.path)
                .with_detail("a request is stuck; the server thread releases its devices when it returns")),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(Error::os(Errno::EIO, "pthread_join").with_detail("the loop server thread panicked"))
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// An fd kept in reserve: when accept(2) fails for want of fds (EMFILE), it is closed so the pending
/// connection can be accepted and dropped, instead of staying ready and spinning the poll loop.
fn spare_fd() -> Option<OwnedFd> {
    open_in(None, "/dev/null", OFlag::O_RDONLY).ok()
}

/// The bound socket's name. Removed when dropped, unless something else has taken the name since.
#[derive(Debug)]
struct SocketFile {
    dir: OwnedFd,
    name: OsString,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    fn bind(sock: BorrowedFd, path: &Path) -> Result<SocketFile> {
        let (parent, name) = seqpacket::split_path(path)
            .ok_or_else(|| Error::os(Errno::EINVAL, "bind").with_path(path).with_detail("not a socket file path"))?;
        let dir = open_in(None, &parent.to_string_lossy(), OFlag::O_PATH | OFlag::O_DIRECTORY)?;
        seqpacket::bind(sock, path)?;
        let st = nix::sys::stat::fstatat(dir.as_raw_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_err(|e| Error::os(e, "stat").with_path(path))?;
        Ok(SocketFile { dir, name: name.to_os_string(), dev: st.st_dev, ino: st.st_ino })
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let same = nix::sys::stat::fstatat(self.dir.as_raw_fd(), self.name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
            .map_or(false, |st| st.st_dev == self.dev && st.st_ino == self.ino);
        if same {
            let _ = unlinkat(Some(self.dir.as_raw_fd()), self.name.as_os_str(), UnlinkatFlags::NoRemoveDir);
        }
    }
}

/// A device attached for a peer, with the node made for it. Released when its reply cannot be delivered
/// (no one would ever know its name) or when the connection that asked for it closes.
#[derive(Debug)]
struct Held {
    /// Kept open for the client; closing it (after the node is gone) is the release.
    lo: Loop,
    dir: OwnedFd,
    /// Taken by `drop`.
    node: Option<Node>,
    uid: u32,
    counters: Arc<Counters>,
}

impl Drop for Held {
    /// Node first (only if it still is our node: see `remove_node`), then the device fd: autoclear detaches
    /// the device once nobody else has it open.
    fn drop(&mut self) {
        if let Some(node) = self.node.take() {
            let _ = node.remove(self.dir.as_fd());
        }
        self.counters.device_released(self.uid);
    }
}

#[derive(Debug)]
struct Outgoing {
    bytes: Vec<u8>,
    device: Option<Held>,
}

#[derive(Debug)]
struct Conn {
    sock: OwnedFd,
    peer: PeerCred,
    /// Replies not yet accepted by the socket; while any is queued we read no more requests.
    outbox: VecDeque<Outgoing>,
    /// Devices whose reply went out: they live as long as this connection.
    devices: Vec<Held>,
    /// A refused peer: it gets one refusal (to its first request, or at this deadline) and is closed.
    refused_until: Option<Instant>,
    /// Last request (or accept): an idle connection that holds nothing is closed after the idle timeout.
    last_active: Instant,
    /// Close once the outbox is sent.
    last_reply: bool,
    dead: bool,
    counters: Arc<Counters>,
}

impl Conn {
    /// When this connection is closed for idling, if it can be.
    fn idle_deadline(&self, timeout: Option<Duration>) -> Option<Instant> {
        let idle = self.refused_until.is_none() && self.outbox.is_empty() && self.devices.is_empty();
        timeout.filter(|_| idle).map(|t| self.last_active + t)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Held's own Drop releases each device: pending replies' and pinned ones alike.
        self.outbox.clear();
        self.devices.clear();
        if self.refused_until.is_none() {
            self.counters.connections.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// The part of the server that talks to the kernel's loop driver.
#[derive(Debug)]
struct Attacher {
    ctl: Option<LoopControl>,
    options: ServerOptions,
    counters: Arc<Counters>,
}

impl Attacher {
    /// Serves one well-formed message: the reply to send and, on success, the device waiting for it.
    fn handle(&mut self, msg: Message, peer: &PeerCred) -> Outgoing {
        let Message { payload, fds, .. } = msg;
        match self.attach(&payload, fds, peer) {
            Ok(held) => Outgoing { bytes: Reply::Device(held.lo.devname()).encode(), device: Some(held) },
            Err(f) => self.failure(f, peer),
        }
    }

    fn failure(&self, f: Failure, peer: &PeerCred) -> Outgoing {
        self.counters.failures.fetch_add(1, Ordering::SeqCst);
        let traceback = format!(
            "loopdev remote loop server: request from pid {} uid {} failed here; no Python traceback\n",
            peer.pid, peer.uid
        );
        let e = Exception::os_error(f.errno(), &f.to_string(), traceback);
        Outgoing { bytes: Reply::Exception(e).encode(), device: None }
    }

    /// Refuses before the kernel is asked when the server, or this uid, holds as many devices as allowed.
    fn check_quota(&self, uid: u32) -> std::result::Result<(), WireError> {
        let o = &self.options;
        if self.counters.devices.load(Ordering::SeqCst) >= o.max_devices {
            return Err(WireError::new(
                Errno::ENOSPC,
                format!("the loop server holds {} devices, its limit", o.max_devices),
            ));
        }
        if self.counters.devices_of(uid) >= o.max_devices_per_uid {
            return Err(WireError::new(
                Errno::EDQUOT,
                format!(
                    "uid {uid} holds {} devices, the most one uid may hold; close connections to release them",
                    o.max_devices_per_uid
                ),
            ));
        }
        Ok(())
    }

    fn attach(&mut self, payload: &[u8], fds: Vec<OwnedFd>, peer: &PeerCred) -> std::result::Result<Held, Failure> {
        let req = Request::parse(payload)?;
        let pick = |i: usize, key: &str| {
            fds.get(i).map(|f| f.as_fd()).ok_or_else(|| {
                WireError::invalid(format!("'{key}' is index {i}, but the message carried {} fds", fds.len()))
            })
        };
        let (backing, dir) = (pick(req.fd, "fd")?, pick(req.dir_fd, "dir_fd")?);
        let access = untrusted::backing(backing)?;
        untrusted::node_dir(dir, peer.uid)?;
        self.check_quota(peer.uid)?;
        if self.ctl.is_none() {
            self.ctl = Some(LoopControl::open(None)?);
        }
        let ctl = self.ctl.as_ref().expect("opened above");
        let mut options = req.configure_options();
        options.read_only |= !access.writable;
        let lo: Loop = ctl.loop_for_fd(backing, &options, req.lock, None::<fn(&Loop) -> Result<()>>)?;
        let peer_uid = Some(peer.uid).filter(|&uid| uid != 0);
        let node = crate::node::make(dir, &lo.devname(), lo.as_fd(), lo.minor(), self.options.node_mode, peer_uid)?;
        let mut fds = fds;
        let dir = fds.swap_remove(req.dir_fd);
        // Every other fd of the message (the backing file: the device holds its own reference) closes here.
        drop(fds);
        self.counters.device_added(peer.uid);
        Ok(Held { lo, dir, node: Some(node), uid: peer.uid, counters: Arc::clone(&self.counters) })
    }
}

/// Why a request failed: refused before the kernel was asked, or the kernel said no.
#[derive(Debug)]
enum Failure {
    Wire(WireError),
    Os(Error),
}

impl Failure {
    fn errno(&self) -> Errno {
        match self {
            Failure::Wire(w) => w.errno,
            Failure::Os(e) => e.errno,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Wire(w) => w.fmt(f),
            Failure::Os(e) => e.fmt(f),
        }
    }
}

impl From<WireError> for Failure {
    fn from(w: WireError) -> Self {
        Failure::Wire(w)
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Os(e)
    }
}

struct Serve {
    socket_file: SocketFile,
    listener: OwnedFd,
    spare: Option<OwnedFd>,
    wake: Arc<OwnedFd>,
    conns: Vec<Conn>,
    attacher: Attacher,
}

impl Serve {
    /// Serves until shut down (or an unexpected error), then releases everything in this order: the socket
    /// name and the listener (no new clients), the connections (removing their nodes and closing their
    /// devices: autoclear frees them), loop-control.
    fn run(mut self) -> Result<()> {
        let result = self.serve();
        let Serve { socket_file, listener, spare: _, wake: _, conns, attacher } = self;
        drop(socket_file);
        drop(listener);
        drop(conns);
        let Attacher { ctl, options: _, counters } = attacher;
        drop(ctl);
        counters.running.store(false, Ordering::SeqCst);
        result
    }

    fn serve(&mut self) -> Result<()> {
        let mut pfds = Vec::new();
        let idle_timeout = self.attacher.options.idle_timeout;
        loop {
            pfds.clear();
            pfds.push(seqpacket::pollfd(self.wake.as_fd(), libc::POLLIN));
            let accepting = self.conns.len() < self.attacher.options.max_connections;
            pfds.push(seqpacket::pollfd(self.listener.as_fd(), if accepting { libc::POLLIN } else { 0 }));
            for c in &self.conns {
                let events = if c.outbox.is_empty() { libc::POLLIN } else { libc::POLLOUT };
                pfds.push(seqpacket::pollfd(c.sock.as_fd(), events));
            }
            let next_deadline =
                self.conns.iter().filter_map(|c| c.refused_until.or_else(|| c.idle_deadline(idle_timeout))).min();
            let timeout = match next_deadline {
                None => -1,
                Some(t) => t.saturating_duration_since(Instant::now()).as_millis().min(i32::MAX as u128) as i32 + 1,
            };
            match seqpacket::poll(&mut pfds, timeout) {
                Err(e) if e.is(Errno::EINTR) => continue,
                other => other?,
            };
            if pfds[0].revents != 0 {
                return Ok(());
            }
            let now = Instant::now();
            for (conn, pfd) in self.conns.iter_mut().zip(&pfds[2..]) {
                if pfd.revents != 0 {
                    service(conn, pfd.revents, &mut self.attacher);
                } else if conn.refused_until.map_or(false, |t| t <= now) {
                    // Never asked (or never read): tell it anyway, best effort, and hang up.
                    if conn.outbox.is_empty() {
                        conn.outbox.push_back(refusal(&self.attacher, &conn.peer, not_allowed(&conn.peer)));
                        flush(conn);
                    }
                    conn.dead = true;
                } else if conn.idle_deadline(idle_timeout).map_or(false, |t| t <= now) {
                    conn.dead = true;
                }
            }
            self.conns.retain(|c| !c.dead);
            if pfds[1].revents != 0 {
                self.accept_all();
            }
        }
    }

    fn accept_all(&mut self) {
        while self.conns.len() < self.attacher.options.max_connections {
            let sock = match seqpacket::accept(self.listener.as_fd()) {
                Ok(s) => s,
                Err(e) if e.is(Errno::EMFILE) || e.is(Errno::ENFILE) => {
                    // Out of fds: take the oldest waiting client off the queue (it sees a hang-up) rather
                    // than wake up for it again at once, forever.
                    self.spare = None;
                    drop(seqpacket::accept(self.listener.as_fd()));
                    self.spare = spare_fd();
                    return;
                }
                // EAGAIN: done. Anything else (ECONNABORTED): try again on the next poll.
                Err(_) => return,
            };
            let peer = match seqpacket::peer_cred(sock.as_fd()) {
                Ok(p) => p,
                Err(_) => continue,
            };
            let counters = &self.attacher.counters;
            if !self.attacher.options.allow_uids.contains(&peer.uid) {
                counters.refused.fetch_add(1, Ordering::SeqCst);
                if self.conns.iter().filter(|c| c.refused_until.is_some()).count() >= MAX_REFUSING {
                    self.refuse_now(sock, &peer, not_allowed(&peer));
                } else {
                    self.conns.push(Conn::new(sock, peer, Some(Instant::now() + REFUSAL_GRACE), counters));
                }
                continue;
            }
            let same_uid = self.conns.iter().filter(|c| c.refused_until.is_none() && c.peer.uid == peer.uid).count();
            if same_uid >= self.attacher.options.max_connections_per_uid {
                counters.refused.fetch_add(1, Ordering::SeqCst);
                let why = WireError::new(
                    Errno::EAGAIN,
                    format!("uid {} has {same_uid} connections open, the most one uid may have", peer.uid),
                );
                self.refuse_now(sock, &peer, why);
                continue;
            }
            counters.connections.fetch_add(1, Ordering::SeqCst);
            self.conns.push(Conn::new(sock, peer, None, counters));
        }
    }

    /// This peer gets its refusal at once and is disconnected. What it already sent is read and dropped first
    /// (closing any fds in it), so it reads our reply, not a reset.
    fn refuse_now(&self, sock: OwnedFd, peer: &PeerCred, why: WireError) {
        let _ = seqpacket::send(sock.as_fd(), &refusal(&self.attacher, peer, why).bytes, &[]);
        let mut buf = [0u8; 64];
        for _ in 0..16 {
            match seqpacket::recv(sock.as_fd(), &mut buf, 4) {
                Ok(p) if p.len > 0 || !p.fds.is_empty() => {}
                _ => break,
            }
        }
    }
}

impl Conn {
    fn new(sock: OwnedFd, peer: PeerCred, refused_until: Option<Instant>, counters: &Arc<Counters>) -> Conn {
        Conn {
            sock,
            peer,
            outbox: VecDeque::new(),
            devices: Vec::new(),
            refused_until,
            last_active: Instant::now(),
            last_reply: false,
            dead: false,
            counters: Arc::clone(counters),
        }
    }
}

/// What a peer whose uid is not allowed is told: that, and nothing about who is allowed.
fn not_allowed(peer: &PeerCred) -> WireError {
    WireError::new(Errno::EPERM, format!("uid {} is not allowed to use this loop server", peer.uid))
}

fn refusal(attacher: &Attacher, peer: &PeerCred, why: WireError) -> Outgoing {
    attacher.failure(Failure::Wire(why), peer)
}

/// Handles one readiness event of a connection: send queued replies, or read and answer one message.
fn service(conn: &mut Conn, revents: i16, attacher: &mut Attacher) {
    if !conn.outbox.is_empty() {
        if revents & libc::POLLOUT != 0 {
            flush(conn);
        } else {
            conn.dead = true; // POLLHUP/POLLERR while a reply waits: the peer is gone.
        }
        return;
    }
    let reply = match jsoncomm::recv_message(conn.sock.as_fd(), &attacher.options.limits) {
        Err(e) if e.is(Errno::EAGAIN) || e.is(Errno::EINTR) => return,
        Err(_) | Ok(Incoming::Closed) => {
            conn.dead = true;
            return;
        }
        // A refused peer's first message, whatever it is (its fds are closed already): refuse and hang up.
        Ok(_) if conn.refused_until.is_some() => {
            conn.last_reply = true;
            refusal(attacher, &conn.peer, not_allowed(&conn.peer))
        }
        Ok(Incoming::Invalid(why)) => {
            attacher.counters.requests.fetch_add(1, Ordering::SeqCst);
            attacher.failure(Failure::Wire(why), &conn.peer)
        }
        Ok(Incoming::Message(msg)) => {
            attacher.counters.requests.fetch_add(1, Ordering::SeqCst);
            attacher.handle(msg, &conn.peer)
        }
    };
    conn.last_active = Instant::now();
    conn.outbox.push_back(reply);
    flush(conn);
}

/// Sends queued replies until the socket is full. A device whose reply went out stays with the connection.
fn flush(conn: &mut Conn) {
    while let Some(out) = conn.outbox.front() {
        match seqpacket::send(conn.sock.as_fd(), &out.bytes, &[]) {
            Ok(_) => {
                if let Some(held) = conn.outbox.pop_front().and_then(|o| o.device) {
                    conn.devices.push(held);
                }
            }
            Err(e) if e.is(Errno::EINTR) => {}
            Err(e) if e.is(Errno::EAGAIN) => return,
            Err(_) => {
                conn.dead = true;
                return;
            }
        }
    }
    if conn.last_reply {
        conn.dead = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::client::Client;
    use crate::remote::wire::Reply;
    use std::fs::File;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("loopdev-server-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn exception(r: Reply) -> Exception {
        match r {
            Reply::Exception(e) => e,
            other => panic!("expected an exception, got {other:?}"),
        }
    }

    #[test]
    fn refuses_bad_fds_without_root_and_removes_its_socket() {
        let dir = temp_dir("badfds");
        let path = dir.join("remoteloop");
        let server = Server::bind(&path, ServerOptions::default()).unwrap();
        assert!(path.exists());
        let client = Client::connect(&path).unwrap();
        let d = File::open(&dir).unwrap();
        let null = File::open("/dev/null").unwrap();

        // A directory as backing file, then /dev/null (a char device): both refused before any ioctl.
        let e = exception(client.request(d.as_fd(), d.as_fd(), &Request::default()).unwrap());
        assert_eq!((e.kind.as_str(), e.errno()), ("OSError", Some(libc::EINVAL)));
        assert!(e.value.contains("not a regular file or block device"), "{}", e.value);
        let e = exception(client.request(null.as_fd(), d.as_fd(), &Request::default()).unwrap());
        assert_eq!(e.errno(), Some(libc::EINVAL));
        // A regular file as directory.
        let f = File::open(std::env::current_exe().unwrap()).unwrap();
        let e = exception(client.request(f.as_fd(), f.as_fd(), &Request::default()).unwrap());
        assert_eq!(e.errno(), Some(libc::ENOTDIR));

        // Raw packets: an index past the fds sent, bad JSON, no fds, the memfd form with a bad request.
        let raw = seqpacket::socket(false).unwrap();
        seqpacket::connect(raw.as_fd(), &path).unwrap();
        let ask = |payload: &[u8], fds: &[BorrowedFd]| {
            jsoncomm::send_message(raw.as_fd(), payload, fds).unwrap();
            let mut buf = vec![0u8; 4096];
            let p = seqpacket::recv(raw.as_fd(), &mut buf, 1).unwrap();
            exception(Reply::parse(&buf[..p.len]).unwrap())
        };
        let wrong_index = Request { dir_fd: 2, ..Request::default() }.encode();
        assert!(ask(&wrong_index, &[f.as_fd(), d.as_fd()]).value.contains("index 2"));
        assert!(ask(b"{\"fd\": 0,", &[f.as_fd(), d.as_fd()]).value.contains("not valid JSON"));
        assert!(ask(&Request::default().encode(), &[]).value.contains("carried 0 fds"));
        let e = ask(b"{}", &[f.as_fd(), d.as_fd(), d.as_fd()]);
        assert_eq!(e.errno(), Some(libc::E2BIG));
        jsoncomm::send_via_fd(raw.as_fd(), br#"{"fd": 1, "dir_fd": 0}"#, &[f.as_fd(), d.as_fd()]).unwrap();
        let mut buf = vec![0u8; 4096];
        let p = seqpacket::recv(raw.as_fd(), &mut buf, 1).unwrap();
        let e = exception(Reply::parse(&buf[..p.len]).unwrap());
        assert!(e.value.contains("backing file"), "the memfd is not counted in the indices: {}", e.value);

        let stats = server.stats();
        assert_eq!((stats.requests, stats.failures, stats.devices, stats.connections), (8, 8, 0, 2));
        drop(client);
        server.shutdown().unwrap();
        assert!(!path.exists(), "the socket file is removed on shutdown");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_peers_that_are_not_allowed() {
        let dir = temp_dir("peer");
        let path = dir.join("remoteloop");
        let options = ServerOptions { allow_uids: vec![u32::MAX - 1], ..ServerOptions::default() };
        let server = Server::bind(&path, options).unwrap();
        let client = Client::connect(&path).unwrap();
        let d = File::open(&dir).unwrap();
        let e = exception(client.request(d.as_fd(), d.as_fd(), &Request::default()).unwrap());
        assert_eq!(e.errno(), Some(libc::EPERM));
        assert!(e.value.contains("is not allowed"), "{}", e.value);
        assert_eq!(server.stats().refused, 1);
        assert_eq!(server.stats().connections, 0);
        drop(server);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_refused_peer_that_never_asks_is_told_and_dropped() {
        let dir = temp_dir("silent");
        let path = dir.join("remoteloop");
        let options = ServerOptions { allow_uids: vec![u32::MAX - 1], ..ServerOptions::default() };
        let server = Server::bind(&path, options).unwrap();
        let raw = seqpacket::socket(false).unwrap();
        seqpacket::connect(raw.as_fd(), &path).unwrap();
        let started = Instant::now();
        let mut buf = vec![0u8; 4096];
        let p = seqpacket::recv(raw.as_fd(), &mut buf, 1).unwrap();
        assert!(started.elapsed() >= REFUSAL_GRACE - Duration::from_millis(100));
        assert_eq!(exception(Reply::parse(&buf[..p.len]).unwrap()).errno(), Some(libc::EPERM));
        assert_eq!(seqpacket::recv(raw.as_fd(), &mut buf, 1).map(|p| p.len).unwrap_or(0), 0, "then EOF");
        assert_eq!(server.stats().refused, 1);
        drop(server);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn binding_an_existing_path_fails_and_leaves_it() {
        let dir = temp_dir("exists");
        let path = dir.join("taken");
        std::fs::write(&path, b"x").unwrap();
        let e = Server::bind(&path, ServerOptions::default()).unwrap_err();
        assert_eq!(e.code(), "EADDRINUSE");
        assert_eq!(std::fs::read(&path).unwrap(), b"x");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
