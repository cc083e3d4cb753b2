//! Serving one request: parse → check what the peer's fds allow (`untrusted`) → reserve a device under the
//! quotas → `loop_for_fd(autoclear)` → node in the peer's directory. Runs on a worker thread (see
//! `workers`): everything here may block on a peer's file.

use super::seqpacket::PeerCred;
use super::untrusted;
use super::wire::{Exception, Reply, Request, WireError};
use crate::control::LoopControl;
use crate::device::Loop;
use crate::error::{Error, Result};
use crate::inode::open_in;
use crate::node::Node;
use nix::errno::Errno;
use nix::fcntl::OFlag;
use std::collections::HashMap;
use std::os::unix::io::AsRawFd;
use std::os::unix::io::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::fdbudget::FdBudget;
use super::options::ServerOptions;

/// Counters the server keeps; read them with `Server::stats`.
#[derive(Debug, Default)]
pub(super) struct Counters {
    pub running: AtomicBool,
    pub connections: AtomicUsize,
    pub devices: AtomicUsize,
    pub requests: AtomicU64,
    pub failures: AtomicU64,
    pub refused: AtomicU64,
    /// Devices (held, or being attached) per peer uid, for the per-uid quota.
    by_uid: Mutex<HashMap<u32, usize>>,
    /// Devices released but still bound, because a peer keeps the fd it was given open: counted against
    /// its quota until the binding goes (uid, `loopN`, the binding's diskseq).
    lingering: Mutex<Vec<(u32, String, u64)>>,
    /// Our fd table: a device keeps 3 of its fds open.
    pub fds: FdBudget,
}

impl Counters {
    pub fn new(fds: FdBudget) -> Counters {
        Counters { fds, ..Counters::default() }
    }

    fn by_uid(&self) -> std::sync::MutexGuard<'_, HashMap<u32, usize>> {
        self.by_uid.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a device for `uid` before the kernel is asked, if the quotas allow one more: several
    /// workers attach at once, so checking and counting are one step.
    fn reserve(self: &Arc<Self>, uid: u32, options: &ServerOptions) -> std::result::Result<Reservation, WireError> {
        let lingering = {
            let mut list = self.lingering.lock().unwrap_or_else(|e| e.into_inner());
            list.retain(|(_, name, seq)| binding_seq(name) == Some(*seq));
            list.iter().filter(|(owner, _, _)| *owner == uid).count()
        };
        let mut map = self.by_uid();
        if self.devices.load(Ordering::SeqCst) >= options.max_devices {
            return Err(WireError::new(
                Errno::ENOSPC,
                format!("the loop server holds {} devices, its limit", options.max_devices),
            ));
        }
        if !self.fds.may_hold_device(uid) {
            return Err(WireError::new(
                Errno::EMFILE,
                format!("the loop server is short of fds ({} left); try again later", self.fds.room()),
            ));
        }
        let mine = map.entry(uid).or_insert(0);
        if *mine + lingering >= options.max_devices_per_uid {
            return Err(WireError::new(
                Errno::EDQUOT,
                format!(
                    "uid {uid} holds {} devices, the most one uid may hold; close connections to release them",
                    options.max_devices_per_uid
                ),
            ));
        }
        *mine += 1;
        self.devices.fetch_add(1, Ordering::SeqCst);
        Ok(Reservation { uid, counters: Arc::clone(self) })
    }

    fn release(&self, uid: u32) {
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

/// One device counted against a uid's quota; uncounted when dropped.
#[derive(Debug)]
struct Reservation {
    uid: u32,
    counters: Arc<Counters>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.counters.release(self.uid);
    }
}

/// A device attached for a peer, with the node made for it. Released when its reply cannot be delivered
/// (no one would ever know its name) or when the connection that asked for it closes.
#[derive(Debug)]
pub(super) struct Held {
    /// Kept open for the client; closing it (after the node is gone) is the release. Taken by `drop`.
    lo: Option<Loop>,
    dir: OwnedFd,
    /// Taken by `drop`.
    node: Option<Node>,
    _quota: Reservation,
}

impl Drop for Held {
    /// Node first (only if it still is our node: see `Node::remove`), then the device fd: autoclear detaches
    /// the device once nobody else has it open. May block on the peer's directory: drop it on a worker.
    fn drop(&mut self) {
        if let Some(node) = self.node.take() {
            let _ = node.remove(self.dir.as_fd());
        }
        if let Some(lo) = self.lo.take() {
            let name = lo.devname();
            let seq = binding_seq(&name);
            drop(lo);
            // Still bound after our last fd: the peer holds the fd it was given (or another opener does).
            if let Some(seq) = seq.filter(|&seq| binding_seq(&name) == Some(seq)) {
                let counters = &self._quota.counters;
                counters.lingering.lock().unwrap_or_else(|e| e.into_inner()).push((self._quota.uid, name, seq));
            }
        }
    }
}

/// The diskseq of `loopN`'s current binding (it changes with every bind); None when unbound.
fn binding_seq(name: &str) -> Option<u64> {
    std::fs::metadata(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    std::fs::read_to_string(format!("/sys/block/{name}/diskseq")).ok()?.trim().parse().ok()
}

impl Held {
    /// Undoes the bind mount now, where blocking is not allowed (see `Node::detach`); the rest of the release
    /// (the placeholder's unlink in the peer's directory, the device's close) is left to `drop`.
    pub fn detach_mount(&mut self) {
        if let Some(node) = self.node.as_mut() {
            node.detach();
        }
    }

    /// The node's name in the peer's directory, for the reply: `loopN`, or `loopN.d/loopN` for a non-root peer.
    fn node_name(&self) -> String {
        self.node.as_ref().map_or_else(String::new, Node::name)
    }
}

/// A reply, and the device it names (which must not outlive an undelivered reply).
#[derive(Debug)]
pub(super) struct Outgoing {
    pub bytes: Vec<u8>,
    /// Sent with the reply (an open fd of the device, when the request asked for it).
    pub fds: Vec<OwnedFd>,
    pub device: Option<Held>,
}

/// The part of the server that talks to the kernel's loop driver; one per worker thread.
#[derive(Debug)]
pub(super) struct Attacher {
    options: Arc<ServerOptions>,
    counters: Arc<Counters>,
}

impl Attacher {
    pub fn new(options: Arc<ServerOptions>, counters: Arc<Counters>) -> Attacher {
        Attacher { options, counters }
    }

    /// Serves one well-formed message: the reply to send and, on success, the device waiting for it.
    pub fn handle(&self, payload: &[u8], fds: Vec<OwnedFd>, peer: &PeerCred) -> Outgoing {
        let started = std::time::Instant::now();
        let file = if self.options.log { Some(backing_name(payload, &fds)) } else { None };
        let (out, result) = match self.attach(payload, fds, peer) {
            Ok((held, fd)) => {
                let name = held.node_name();
                let bytes = Reply::Device(name.clone()).encode();
                (Outgoing { bytes, fds: fd.into_iter().collect(), device: Some(held) }, name)
            }
            Err(f) => {
                let why = f.to_string();
                (failure(&self.counters, f, peer), format!("refused: {why}"))
            }
        };
        if let Some(file) = file {
            // One write per line (eprintln! may write in pieces, which other writers to stderr split).
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            let (file, result) = (loggable(&file), loggable(&result));
            let line = format!("loopdev serve: pid {} uid {}: {file} -> {result} ({ms:.1} ms)\n", peer.pid, peer.uid);
            let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
        }
        out
    }

    /// The device held for the peer, and an fd of it for the peer when the request asked for one.
    fn attach(
        &self,
        payload: &[u8],
        fds: Vec<OwnedFd>,
        peer: &PeerCred,
    ) -> std::result::Result<(Held, Option<OwnedFd>), Failure> {
        let req = Request::parse(payload)?;
        let pick = |i: usize, key: &str| {
            fds.get(i).map(|f| f.as_fd()).ok_or_else(|| {
                WireError::invalid(format!("'{key}' is index {i}, but the message carried {} fds", fds.len()))
            })
        };
        let (backing, dir) = (pick(req.fd, "fd")?, pick(req.dir_fd, "dir_fd")?);
        if req.want_fd && peer.uid != 0 {
            // The kernel checks little but the fd: LOOP_CHANGE_FD, LOOP_CLR_FD, LOOP_SET_STATUS64 (writable),
            // block tracing (kernel memory of the holder's choosing), and the device's own locks (a
            // direct-I/O write from a mapping of the device deadlocks it). See README, "What the peer holds".
            return Err(WireError::new(
                Errno::EPERM,
                "an open fd of a loop device lets its holder rebind it (LOOP_CHANGE_FD), trace it into kernel \
                 memory (BLKTRACESETUP) or deadlock it: it is given to root only",
            )
            .into());
        }
        let access = untrusted::backing(backing)?;
        untrusted::node_dir(dir, peer.uid)?;
        let quota = self.counters.reserve(peer.uid, &self.options)?;
        // Opened per request, not per worker: its own open file description, so loop-control's flock
        // serialises the workers, and idle workers hold no fd.
        let ctl = LoopControl::open(None)?;
        let mut options = req.configure_options();
        options.read_only |= !access.writable;
        // Refused as `attach` refuses it, not bound as an empty device (osbuild's server binds it).
        crate::attach::mapped_size(backing, &options)?;
        let lo: Loop = ctl.loop_for_fd(backing, &options, req.lock, None::<fn(&Loop) -> Result<()>>)?;
        if req.partscan {
            // Where the kernel has no parser for the table, register the partitions as it would (BLKPG);
            // clearing the device drops them. A table we cannot trust just gives none.
            let _ = lo.add_partitions();
        }
        let node = if peer.uid == 0 {
            crate::node::make(dir, &lo.devname(), lo.as_fd(), lo.rdev(), self.options.node_mode)?
        } else {
            crate::node::make_for_peer(dir, &lo.devname(), lo.as_fd(), lo.rdev())?
        };
        let mut fds = fds;
        let dir = fds.swap_remove(req.dir_fd);
        // Every other fd of the message (the backing file: the device holds its own reference) closes here.
        drop(fds);
        // A fresh open, not a dup: the peer's fd shares no file status flags or locks with ours.
        let fd = if req.want_fd {
            let mode = if options.read_only { OFlag::O_RDONLY } else { OFlag::O_RDWR };
            Some(open_in(None, &format!("/proc/self/fd/{}", lo.as_fd().as_raw_fd()), mode)?)
        } else {
            None
        };
        Ok((Held { lo: Some(lo), dir, node: Some(node), _quota: quota }, fd))
    }
}

/// `s` (a peer's file name, an error naming its directory) for a line of the log: control characters and
/// backslashes escaped, so that a name with a newline cannot add a line of the peer's choosing (red team
/// round 18).
fn loggable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() || c == '\\' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The backing file of a request, for the log: its path as the kernel names the fd ("?" when unknown).
fn backing_name(payload: &[u8], fds: &[OwnedFd]) -> String {
    Request::parse(payload)
        .ok()
        .and_then(|r| fds.get(r.fd))
        .and_then(|fd| std::fs::read_link(format!("/proc/self/fd/{}", std::os::unix::io::AsRawFd::as_raw_fd(fd))).ok())
        .map_or_else(|| "?".into(), |p| p.display().to_string())
}

/// The exception reply for `why`, counted as a failure.
pub(super) fn failure(counters: &Counters, why: impl Into<Failure>, peer: &PeerCred) -> Outgoing {
    let why = why.into();
    counters.failures.fetch_add(1, Ordering::SeqCst);
    let traceback = format!(
        "loopdev remote loop server: request from pid {} uid {} failed here; no Python traceback\n",
        peer.pid, peer.uid
    );
    let e = Exception::os_error(why.errno(), &why.to_string(), traceback);
    Outgoing { bytes: Reply::Exception(e).encode(), fds: Vec::new(), device: None }
}

/// Why a request failed: refused before the kernel was asked, or the kernel said no.
#[derive(Debug)]
pub(super) enum Failure {
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

#[cfg(test)]
mod tests {
    use super::loggable;

    #[test]
    fn a_name_cannot_add_a_line_to_the_log() {
        let name = "x\nloopdev serve: pid 1 uid 0: shadow.img -> loop7 (0.3 ms)\u{1b}[2K\\é";
        assert_eq!(loggable(name), "x\\nloopdev serve: pid 1 uid 0: shadow.img -> loop7 (0.3 ms)\\u{1b}[2K\\\\é");
    }
}
