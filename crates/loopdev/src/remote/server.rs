//! The remote loop server, wire-compatible with osbuild's `LoopServer`.
//!
//! One thread per server owns everything: the listening socket, the connections, the `LoopControl` and
//! every `Loop` it attached. It waits in poll(2) on the listener, the connections and an eventfd that
//! `Server::shutdown` signals, and serves each request to the end before looking at the next one, so a
//! configure that waits on the kernel only ever stalls this thread. Requests: receive (every fd owned at
//! once) → check peer, framing, JSON, fd indices and fd types → `loop_for_fd(autoclear)` → `mknod` into the
//! client's directory → reply. Each device stays open (pinned) until the server stops; then the thread closes
//! them all, and autoclear frees every device no one else holds.

use super::jsoncomm::{self, Incoming, Limits, Message};
use super::seqpacket::{self, PeerCred};
use super::wire::{Exception, Reply, Request, WireError};
use crate::control::LoopControl;
use crate::device::{open_in, remove_node, stat_fd, Loop};
use crate::error::{Error, Result};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};
use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::unix::io::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerOptions {
    /// Peers (by `SO_PEERCRED` uid) allowed to ask for devices. Default: our effective uid and root.
    pub allow_uids: Vec<u32>,
    pub limits: Limits,
    pub max_connections: usize,
    /// Permissions of the device node made in the client's directory (osbuild: 0o600).
    pub node_mode: u32,
}

impl Default for ServerOptions {
    fn default() -> Self {
        let mut allow_uids = vec![nix::unistd::geteuid().as_raw(), 0];
        allow_uids.dedup();
        ServerOptions { allow_uids, limits: DEFAULT_LIMITS, max_connections: DEFAULT_MAX_CONNECTIONS, node_mode: 0o600 }
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// The thread is serving (false after shutdown, or if it stopped on an unexpected error).
    pub running: bool,
    /// Open client connections.
    pub connections: usize,
    /// Devices attached and held open by the server.
    pub devices: usize,
    /// Messages received (well-formed or not).
    pub requests: u64,
    /// Exception replies sent.
    pub failures: u64,
    /// Connections turned away because of their peer uid.
    pub refused: u64,
}

/// A running server. Dropping it shuts it down too (blocking until the thread is done).
#[derive(Debug)]
pub struct Server {
    path: PathBuf,
    wake: Arc<OwnedFd>,
    counters: Arc<Counters>,
    thread: Option<JoinHandle<Result<()>>>,
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
            wake: Arc::clone(&wake),
            conns: Vec::new(),
            attacher: Attacher { ctl: None, devices: Vec::new(), options, counters: Arc::clone(&counters) },
        };
        let thread = std::thread::Builder::new()
            .name("loopdev-server".into())
            .spawn(move || serve.run())
            .map_err(|e| Error::os(Errno::from_i32(e.raw_os_error().unwrap_or(libc::EAGAIN)), "clone"))?;
        Ok(Server { path: path.to_path_buf(), wake, counters, thread: Some(thread) })
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

    /// Stops serving: closes the listener and every connection, removes the socket file, closes every
    /// device (autoclear detaches each one no one else has open). Returns when the thread is done; an
    /// error the thread stopped on earlier is returned here.
    pub fn shutdown(mut self) -> Result<()> {
        self.stop()
    }

    fn stop(&mut self) -> Result<()> {
        let thread = match self.thread.take() {
            Some(t) => t,
            None => return Ok(()),
        };
        // An eventfd counter cannot overflow from one write; if it failed the thread is gone already.
        let _ = seqpacket::eventfd_signal(self.wake.as_fd());
        match thread.join() {
            Ok(result) => result,
            Err(_) => Err(Error::os(Errno::EIO, "pthread_join").with_detail("the loop server thread panicked")),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.stop();
    }
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

/// A device attached for a reply not yet sent: if the reply cannot be delivered, no one will ever know
/// the device's name, so it is released (node removed, device closed) instead of pinned.
#[derive(Debug)]
struct Pending {
    lo: Loop,
    dir: OwnedFd,
    name: String,
}

impl Pending {
    fn release(self) {
        let _ = remove_node(self.dir.as_fd(), &self.name);
    }
}

#[derive(Debug)]
struct Outgoing {
    bytes: Vec<u8>,
    device: Option<Pending>,
}

#[derive(Debug)]
struct Conn {
    sock: OwnedFd,
    peer: PeerCred,
    /// Replies not yet accepted by the socket; while any is queued we read no more requests.
    outbox: VecDeque<Outgoing>,
    /// A refused peer: it gets one refusal (to its first request, or at this deadline) and is closed.
    refused_until: Option<Instant>,
    /// Close once the outbox is sent.
    last_reply: bool,
    dead: bool,
    counters: Arc<Counters>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        for out in self.outbox.drain(..) {
            if let Some(p) = out.device {
                p.release();
            }
        }
        if self.refused_until.is_none() {
            self.counters.connections.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Owns the devices; the part of the server that talks to the kernel's loop driver.
#[derive(Debug)]
struct Attacher {
    ctl: Option<LoopControl>,
    devices: Vec<Loop>,
    options: ServerOptions,
    counters: Arc<Counters>,
}

impl Attacher {
    fn keep(&mut self, lo: Loop) {
        self.devices.push(lo);
        self.counters.devices.store(self.devices.len(), Ordering::SeqCst);
    }

    /// Serves one well-formed message: the reply to send and, on success, the device waiting for it.
    fn handle(&mut self, msg: Message, peer: &PeerCred) -> Outgoing {
        let Message { payload, fds, .. } = msg;
        match self.attach(&payload, fds) {
            Ok(p) => Outgoing { bytes: Reply::Device(p.name.clone()).encode(), device: Some(p) },
            Err(f) => self.failure(f, peer),
        }
    }

    fn failure(&self, f: Failure, peer: &PeerCred) -> Outgoing {
        self.counters.failures.fetch_add(1, Ordering::SeqCst);
        let traceback = format!(
            "loopdev remote loop server (pid {}): request from pid {} uid {} failed here; no Python traceback\n",
            std::process::id(),
            peer.pid,
            peer.uid
        );
        let e = Exception::os_error(f.errno(), &f.to_string(), traceback);
        Outgoing { bytes: Reply::Exception(e).encode(), device: None }
    }

    fn attach(&mut self, payload: &[u8], fds: Vec<OwnedFd>) -> std::result::Result<Pending, Failure> {
        let req = Request::parse(payload)?;
        let pick = |i: usize, key: &str| {
            fds.get(i).map(|f| f.as_fd()).ok_or_else(|| {
                WireError::invalid(format!("'{key}' is index {i}, but the message carried {} fds", fds.len()))
            })
        };
        let (backing, dir) = (pick(req.fd, "fd")?, pick(req.dir_fd, "dir_fd")?);
        check_backing(backing)?;
        check_dir(dir)?;
        if self.ctl.is_none() {
            self.ctl = Some(LoopControl::open(None)?);
        }
        let ctl = self.ctl.as_ref().expect("opened above");
        let lo: Loop = ctl.loop_for_fd(backing, &req.configure_options(), req.lock, None::<fn(&Loop) -> Result<()>>)?;
        lo.mknod(dir, self.options.node_mode)?;
        let mut fds = fds;
        let dir = fds.swap_remove(req.dir_fd);
        // Every other fd of the message (the backing file: the device holds its own reference) closes here.
        drop(fds);
        Ok(Pending { name: lo.devname(), lo, dir })
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

fn file_type(fd: BorrowedFd) -> std::result::Result<u32, Failure> {
    if seqpacket::status_flags(fd)?.contains(OFlag::O_PATH) {
        return Err(WireError::new(Errno::EBADF, "an O_PATH file descriptor cannot be used").into());
    }
    Ok(stat_fd(fd)?.st_mode & libc::S_IFMT)
}

/// The kernel binds regular files and block devices only; refuse the rest before touching a device.
fn check_backing(fd: BorrowedFd) -> std::result::Result<(), Failure> {
    match file_type(fd)? {
        libc::S_IFREG | libc::S_IFBLK => Ok(()),
        _ => Err(WireError::invalid("the backing file ('fd') is not a regular file or block device").into()),
    }
}

fn check_dir(fd: BorrowedFd) -> std::result::Result<(), Failure> {
    // O_PATH directories are fine: osbuild's client opens "/dev" with O_DIRECTORY, but *at() calls need no more.
    let st = stat_fd(fd)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        return Err(WireError::new(Errno::ENOTDIR, "'dir_fd' is not a directory").into());
    }
    Ok(())
}

struct Serve {
    socket_file: SocketFile,
    listener: OwnedFd,
    wake: Arc<OwnedFd>,
    conns: Vec<Conn>,
    attacher: Attacher,
}

impl Serve {
    /// Serves until shut down (or an unexpected error), then releases everything in this order: the socket
    /// name and the listener (no new clients), the connections (releasing devices whose reply never left),
    /// the devices (autoclear frees them), loop-control.
    fn run(mut self) -> Result<()> {
        let result = self.serve();
        let Serve { socket_file, listener, wake: _, conns, attacher } = self;
        drop(socket_file);
        drop(listener);
        drop(conns);
        let Attacher { ctl, devices, options: _, counters } = attacher;
        drop(devices);
        drop(ctl);
        counters.devices.store(0, Ordering::SeqCst);
        counters.running.store(false, Ordering::SeqCst);
        result
    }

    fn serve(&mut self) -> Result<()> {
        let mut pfds = Vec::new();
        loop {
            pfds.clear();
            pfds.push(seqpacket::pollfd(self.wake.as_fd(), libc::POLLIN));
            let accepting = self.conns.len() < self.attacher.options.max_connections;
            pfds.push(seqpacket::pollfd(self.listener.as_fd(), if accepting { libc::POLLIN } else { 0 }));
            for c in &self.conns {
                let events = if c.outbox.is_empty() { libc::POLLIN } else { libc::POLLOUT };
                pfds.push(seqpacket::pollfd(c.sock.as_fd(), events));
            }
            let timeout = match self.conns.iter().filter_map(|c| c.refused_until).min() {
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
                        conn.outbox.push_back(refusal(&self.attacher, &conn.peer));
                        flush(conn, &mut self.attacher);
                    }
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
                // EAGAIN: done. Anything else (ECONNABORTED, EMFILE): try again on the next poll.
                Err(_) => return,
            };
            let peer = match seqpacket::peer_cred(sock.as_fd()) {
                Ok(p) => p,
                Err(_) => continue,
            };
            let allowed = self.attacher.options.allow_uids.contains(&peer.uid);
            if !allowed {
                self.attacher.counters.refused.fetch_add(1, Ordering::SeqCst);
                if self.conns.iter().filter(|c| c.refused_until.is_some()).count() >= MAX_REFUSING {
                    self.refuse_now(sock, &peer);
                    continue;
                }
            } else {
                self.attacher.counters.connections.fetch_add(1, Ordering::SeqCst);
            }
            self.conns.push(Conn {
                sock,
                peer,
                outbox: VecDeque::new(),
                refused_until: if allowed { None } else { Some(Instant::now() + REFUSAL_GRACE) },
                last_reply: false,
                dead: false,
                counters: Arc::clone(&self.attacher.counters),
            });
        }
    }

    /// Too many refused peers waiting already: this one gets its refusal at once and is disconnected. What
    /// it already sent is read and dropped first (closing any fds in it), so it reads our reply, not a reset.
    fn refuse_now(&self, sock: OwnedFd, peer: &PeerCred) {
        let _ = seqpacket::send(sock.as_fd(), &refusal(&self.attacher, peer).bytes, &[]);
        let mut buf = [0u8; 64];
        for _ in 0..16 {
            match seqpacket::recv(sock.as_fd(), &mut buf, 4) {
                Ok(p) if p.len > 0 || !p.fds.is_empty() => {}
                _ => break,
            }
        }
    }
}

/// The exception a peer whose uid is not allowed gets.
fn refusal(attacher: &Attacher, peer: &PeerCred) -> Outgoing {
    let why = WireError::new(
        Errno::EPERM,
        format!("uid {} is not allowed to use this loop server (allowed: {:?})", peer.uid, attacher.options.allow_uids),
    );
    attacher.failure(Failure::Wire(why), peer)
}

/// Handles one readiness event of a connection: send queued replies, or read and answer one message.
fn service(conn: &mut Conn, revents: i16, attacher: &mut Attacher) {
    if !conn.outbox.is_empty() {
        if revents & libc::POLLOUT != 0 {
            flush(conn, attacher);
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
            refusal(attacher, &conn.peer)
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
    conn.outbox.push_back(reply);
    flush(conn, attacher);
}

/// Sends queued replies until the socket is full. A device whose reply went out is pinned.
fn flush(conn: &mut Conn, attacher: &mut Attacher) {
    while let Some(out) = conn.outbox.front() {
        match seqpacket::send(conn.sock.as_fd(), &out.bytes, &[]) {
            Ok(_) => {
                if let Some(p) = conn.outbox.pop_front().and_then(|o| o.device) {
                    attacher.keep(p.lo);
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
