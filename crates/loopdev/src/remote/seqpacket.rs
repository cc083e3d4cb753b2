//! AF_UNIX `SOCK_SEQPACKET` sockets with fds in `SCM_RIGHTS`: the transport of osbuild's jsoncomm.
//! One small safe function per system call; every fd the kernel hands us becomes an `OwnedFd` at once,
//! so nothing received can leak whatever the caller does next.

use crate::error::{Error, Result};
use nix::errno::Errno;
use nix::sys::socket::{
    self, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};
use std::ffi::CStr;
use std::io::IoSlice;
use std::io::IoSliceMut;
use std::os::unix::io::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The kernel's limit of fds in one `SCM_RIGHTS` message (osbuild sizes its receive buffer for it).
pub const SCM_MAX_FD: usize = 253;

/// `sun_path` holds 108 bytes including the terminating NUL.
const SUN_PATH_MAX: usize = 107;

fn own(raw: RawFd) -> OwnedFd {
    // SAFETY: every caller passes an fd the kernel just returned to us and that nothing else owns.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// Credentials of the peer of a connected socket (`SO_PEERCRED`), as of `connect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC [| SOCK_NONBLOCK]).
pub fn socket(nonblocking: bool) -> Result<OwnedFd> {
    let flags = if nonblocking { SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK } else { SockFlag::SOCK_CLOEXEC };
    socket::socket(AddressFamily::Unix, SockType::SeqPacket, flags, None).map(own).map_err(|e| Error::os(e, "socket"))
}

/// socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC): a connected pair, for tests and in-process use.
pub fn socketpair() -> Result<(OwnedFd, OwnedFd)> {
    socket::socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
        .map(|(a, b)| (own(a), own(b)))
        .map_err(|e| Error::os(e, "socketpair"))
}

/// A path usable as `sun_path`. Paths longer than `sun_path` go through `/proc/self/fd/<parent>/<name>`,
/// so `parent` must stay open until the bind or connect is done.
pub struct SocketAddr {
    addr: UnixAddr,
    _parent: Option<OwnedFd>,
}

impl SocketAddr {
    pub fn new(path: &Path) -> Result<SocketAddr> {
        let err = |e: Errno| Error::os(e, "socket").with_path(path);
        if path.as_os_str().len() <= SUN_PATH_MAX {
            return Ok(SocketAddr { addr: UnixAddr::new(path).map_err(err)?, _parent: None });
        }
        let (parent, name) = split_path(path).ok_or_else(|| err(Errno::ENAMETOOLONG))?;
        let dir = crate::inode::open_in(None, &parent.to_string_lossy(), nix::fcntl::OFlag::O_PATH)
            .map_err(|e| e.with_path(path))?;
        let short = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(name);
        Ok(SocketAddr { addr: UnixAddr::new(&short).map_err(err)?, _parent: Some(dir) })
    }
}

/// `(parent, file name)` of a path that names a file.
pub fn split_path(path: &Path) -> Option<(PathBuf, &std::ffi::OsStr)> {
    let name = path.file_name()?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Some((parent, name))
}

/// bind(2) to a filesystem path.
pub fn bind(fd: BorrowedFd, path: &Path) -> Result<()> {
    let addr = SocketAddr::new(path)?;
    socket::bind(fd.as_raw_fd(), &addr.addr).map_err(|e| Error::os(e, "bind").with_path(path))
}

/// bind(2) with an empty address: Linux autobinds the socket to a unique abstract name (osbuild's
/// `sock.bind("")`), so the server sees who is talking even before `SO_PEERCRED`.
pub fn bind_auto(fd: BorrowedFd) -> Result<()> {
    socket::bind(fd.as_raw_fd(), &UnixAddr::new_unnamed()).map_err(|e| Error::os(e, "bind"))
}

/// listen(2).
pub fn listen(fd: BorrowedFd, backlog: usize) -> Result<()> {
    socket::listen(fd.as_raw_fd(), backlog).map_err(|e| Error::os(e, "listen"))
}

/// connect(2) to a filesystem path.
pub fn connect(fd: BorrowedFd, path: &Path) -> Result<()> {
    let addr = SocketAddr::new(path)?;
    socket::connect(fd.as_raw_fd(), &addr.addr).map_err(|e| Error::os(e, "connect").with_path(path))
}

/// accept4(2) with `SOCK_CLOEXEC | SOCK_NONBLOCK`.
pub fn accept(fd: BorrowedFd) -> Result<OwnedFd> {
    socket::accept4(fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK)
        .map(own)
        .map_err(|e| Error::os(e, "accept"))
}

/// Checks that `fd` is an AF_UNIX SOCK_SEQPACKET socket in listening state, makes it non-blocking, and returns
/// the path it is bound to (for messages; empty for an abstract or unnamed socket).
pub fn listening_seqpacket(fd: BorrowedFd) -> Result<PathBuf> {
    let invalid = |detail: &str| Error::os(Errno::EINVAL, "getsockopt").with_detail(detail);
    let kind = socket::getsockopt(fd.as_raw_fd(), socket::sockopt::SockType).map_err(|e| Error::os(e, "getsockopt"))?;
    let listening =
        socket::getsockopt(fd.as_raw_fd(), socket::sockopt::AcceptConn).map_err(|e| Error::os(e, "getsockopt"))?;
    if kind != socket::SockType::SeqPacket || !listening {
        return Err(invalid("the socket passed in is not a listening SOCK_SEQPACKET socket"));
    }
    let addr: UnixAddr =
        socket::getsockname(fd.as_raw_fd()).map_err(|_| invalid("the socket passed in is not AF_UNIX"))?;
    let flags = status_flags(fd)?;
    nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags | nix::fcntl::OFlag::O_NONBLOCK))
        .map_err(|e| Error::os(e, "fcntl"))?;
    Ok(addr.path().map(Path::to_path_buf).unwrap_or_default())
}

/// getsockopt(SO_PEERCRED).
pub fn peer_cred(fd: BorrowedFd) -> Result<PeerCred> {
    let cred =
        socket::getsockopt(fd.as_raw_fd(), socket::sockopt::PeerCredentials).map_err(|e| Error::os(e, "getsockopt"))?;
    Ok(PeerCred { pid: cred.pid(), uid: cred.uid(), gid: cred.gid() })
}

/// shutdown(SHUT_RDWR): wakes a thread blocked in `recv` on the same socket.
pub fn shutdown(fd: BorrowedFd) -> Result<()> {
    socket::shutdown(fd.as_raw_fd(), socket::Shutdown::Both).map_err(|e| Error::os(e, "shutdown"))
}

/// shutdown(SHUT_RD): on a listener, new connections are refused (ECONNREFUSED); on a connection, the peer
/// can queue nothing more (EPIPE).
pub fn shutdown_read(fd: BorrowedFd) -> Result<()> {
    socket::shutdown(fd.as_raw_fd(), socket::Shutdown::Read).map_err(|e| Error::os(e, "shutdown"))
}

/// sendmsg(2) of one packet, `fds` in one `SCM_RIGHTS` message (none when empty). `MSG_NOSIGNAL`: a peer
/// that went away is EPIPE, never SIGPIPE. On a non-blocking socket a full peer is EAGAIN. A signal that
/// interrupts a blocking send (nothing was sent) is retried.
pub fn send(fd: BorrowedFd, bytes: &[u8], fds: &[BorrowedFd]) -> Result<usize> {
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let rights = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage] = if raw.is_empty() { &[] } else { &rights };
    loop {
        match socket::sendmsg::<()>(fd.as_raw_fd(), &[IoSlice::new(bytes)], cmsgs, MsgFlags::MSG_NOSIGNAL, None) {
            Err(Errno::EINTR) => continue,
            other => return other.map_err(|e| Error::os(e, "sendmsg")),
        }
    }
}

/// One received packet. `fds` holds every descriptor that arrived, already owned (close-on-exec).
#[derive(Debug)]
pub struct Packet {
    /// Bytes stored in the buffer (at most its length).
    pub len: usize,
    pub fds: Vec<OwnedFd>,
    /// `MSG_TRUNC`: the packet was longer than the buffer; the rest is gone.
    pub truncated: bool,
    /// `MSG_CTRUNC`: more fds were sent than fitted; the kernel closed the rest.
    pub fds_truncated: bool,
}

/// recvmsg(2) of one packet with `MSG_CMSG_CLOEXEC` and room for `max_fds` descriptors. Extra descriptors
/// are dropped by the kernel (`fds_truncated`), or arrive in the alignment slack of the control buffer
/// (then `fds.len() > max_fds`): either way the caller owns whatever arrived.
pub fn recv(fd: BorrowedFd, buf: &mut [u8], max_fds: usize) -> Result<Packet> {
    let mut cmsg = Vec::with_capacity(cmsg_space(max_fds));
    let mut iov = [IoSliceMut::new(buf)];
    let mut control = if max_fds == 0 { None } else { Some(&mut cmsg) };
    // A signal before anything arrived takes nothing from the socket: try again.
    let msg = loop {
        match socket::recvmsg::<()>(fd.as_raw_fd(), &mut iov, control.as_deref_mut(), MsgFlags::MSG_CMSG_CLOEXEC) {
            Err(Errno::EINTR) => continue,
            other => break other.map_err(|e| Error::os(e, "recvmsg"))?,
        }
    };
    let mut fds = Vec::new();
    for c in msg.cmsgs() {
        if let ControlMessageOwned::ScmRights(raw) = c {
            fds.extend(raw.into_iter().map(own));
        }
    }
    Ok(Packet {
        len: msg.bytes,
        fds,
        truncated: msg.flags.contains(MsgFlags::MSG_TRUNC),
        fds_truncated: msg.flags.contains(MsgFlags::MSG_CTRUNC),
    })
}

/// recv(MSG_PEEK | MSG_TRUNC [| MSG_DONTWAIT]): the full length of the next packet, without taking it.
/// 0 = end of stream (osbuild treats an empty packet the same way).
pub fn peek_len(fd: BorrowedFd, wait: bool) -> Result<usize> {
    let mut none = [0u8; 0];
    let mut flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_TRUNC;
    if !wait {
        flags |= MsgFlags::MSG_DONTWAIT;
    }
    socket::recv(fd.as_raw_fd(), &mut none, flags).map_err(|e| Error::os(e, "recvmsg"))
}

/// `disarm` to take every packet there is, however many.
pub const EVERY_PACKET: usize = usize::MAX;

/// What is still queued on a peer's socket once `disarm` has run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leftover {
    /// Nothing: closing the socket closes nothing of the peer's, so it cannot block.
    Nothing,
    /// Packets with fds (or we could not tell): closing the socket closes those fds, which the peer may have
    /// made block for as long as it likes.
    Fds,
    /// More packets than `disarm` was asked to take, none with fds so far: what follows is not known yet.
    More,
}

/// Prepares a peer's socket we are done with for closing. Its receiving side is shut first, so the peer can
/// queue nothing more (its sends get EPIPE); then the queued packets that carry no fds are taken off the
/// queue, up to the first one that does, or up to `most` of them (`EVERY_PACKET`: all). Never blocks.
///
/// Telling "a packet with no bytes" from "end of queue" needs `SO_PASSCRED` (every packet then carries
/// credentials); telling "a packet with fds" without taking them needs a peek whose control buffer has room
/// for the credentials and for no fd (the kernel then sets `MSG_CTRUNC` and installs none).
pub fn disarm(fd: BorrowedFd, most: usize) -> Leftover {
    if shutdown_read(fd).is_err() || socket::setsockopt(fd.as_raw_fd(), socket::sockopt::PassCred, &true).is_err() {
        return Leftover::Fds;
    }
    // The queue is finite once shut: the peer's send buffer (at most twice wmem_max) holds it, and a packet
    // takes at least a few hundred bytes of that. So `Fds` means fds were found, and the receives it costs
    // us are as many as the sends it cost the peer.
    static MOST: AtomicUsize = AtomicUsize::new(0);
    if MOST.load(Ordering::Relaxed) == 0 {
        MOST.store((2 * wmem_max() / 256).max(4096), Ordering::Relaxed);
    }
    let bounded = most < MOST.load(Ordering::Relaxed);
    for _ in 0..most.min(MOST.load(Ordering::Relaxed)) {
        match credentials_only(fd, true) {
            Ok(Head::Empty) => return Leftover::Nothing,
            Ok(Head::Plain) => {
                if credentials_only(fd, false) != Ok(Head::Plain) {
                    return Leftover::Fds;
                }
            }
            Ok(Head::Fds) | Err(_) => return Leftover::Fds,
        }
    }
    match credentials_only(fd, true) {
        Ok(Head::Empty) => Leftover::Nothing,
        Ok(Head::Plain) if bounded => Leftover::More,
        _ => Leftover::Fds,
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Head {
    Empty,
    Plain,
    Fds,
}

/// recvmsg(MSG_DONTWAIT [| MSG_PEEK]) of the next packet with room for its credentials and no fds (see
/// `disarm`; call it only with `SO_PASSCRED` set).
fn credentials_only(fd: BorrowedFd, peek: bool) -> std::result::Result<Head, Errno> {
    #[repr(C, align(8))]
    struct Control([u8; 64]);
    let mut control = Control([0; 64]);
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: byte.len() };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.0.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::ucred>() as u32) } as usize;
    let flags = libc::MSG_DONTWAIT | if peek { libc::MSG_PEEK } else { 0 };
    let mut resets = 0;
    loop {
        // SAFETY: msg points at `iov` and `control`, which outlive the call and are as long as it says.
        let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, flags) };
        match Errno::result(n) {
            Err(Errno::EINTR) => continue,
            // The peer hung up with our reply unread: the error is reported once, by whichever receive
            // comes next (a peek or a take), takes nothing off the queue, and is cleared.
            Err(Errno::ECONNRESET) if resets < 2 => resets += 1,
            Err(Errno::EAGAIN) => return Ok(Head::Empty),
            Err(e) => return Err(e),
            Ok(_) if msg.msg_flags & libc::MSG_CTRUNC != 0 => return Ok(Head::Fds),
            Ok(_) if msg.msg_controllen == 0 => return Ok(Head::Empty),
            Ok(_) => return Ok(Head::Plain),
        }
    }
}

fn cmsg_space(fds: usize) -> usize {
    let bytes = (fds * std::mem::size_of::<RawFd>()) as u32;
    // SAFETY: CMSG_SPACE only computes a size.
    unsafe { libc::CMSG_SPACE(bytes) as usize }
}

/// memfd_create(2) with `MFD_CLOEXEC`; `name` is NUL-terminated.
pub fn memfd(name: &[u8]) -> Result<OwnedFd> {
    use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
    let name = CStr::from_bytes_with_nul(name).map_err(|_| Error::os(Errno::EINVAL, "memfd_create"))?;
    memfd_create(name, MemFdCreateFlag::MFD_CLOEXEC).map(own).map_err(|e| Error::os(e, "memfd_create"))
}

/// fcntl(F_GETFL): the open flags of `fd` (to refuse `O_PATH` descriptors).
pub fn status_flags(fd: BorrowedFd) -> Result<nix::fcntl::OFlag> {
    let bits = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL).map_err(|e| Error::os(e, "fcntl"))?;
    Ok(nix::fcntl::OFlag::from_bits_truncate(bits))
}

/// fcntl(F_GET_SEALS): succeeds only on shmem files (memfd, tmpfs), whose reads never block.
pub fn seals(fd: BorrowedFd) -> Result<i32> {
    nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GET_SEALS).map_err(|e| Error::os(e, "fcntl"))
}

/// eventfd(2), non-blocking and close-on-exec: how other threads wake the server's poll thread.
pub fn eventfd() -> Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers; the result is checked before it is owned.
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    Errno::result(raw).map(own).map_err(|e| Error::os(e, "eventfd"))
}

/// Adds 1 to an eventfd.
pub fn eventfd_signal(fd: BorrowedFd) -> Result<()> {
    nix::unistd::write(fd.as_raw_fd(), &1u64.to_ne_bytes()).map(drop).map_err(|e| Error::os(e, "write"))
}

/// Resets an eventfd to 0 (nothing to do if it is 0 already: it is non-blocking).
pub fn eventfd_take(fd: BorrowedFd) {
    let mut counter = [0u8; 8];
    let _ = nix::unistd::read(fd.as_raw_fd(), &mut counter);
}

/// poll(2). EINTR is returned to the caller, which simply polls again.
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> Result<usize> {
    // SAFETY: the pointer and length describe `fds`, which poll only writes `revents` into.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    Errno::result(n).map(|n| n as usize).map_err(|e| Error::os(e, "poll"))
}

/// A `pollfd` for `fd` waiting on `events`.
pub fn pollfd(fd: BorrowedFd, events: i16) -> libc::pollfd {
    libc::pollfd { fd: fd.as_raw_fd(), events, revents: 0 }
}

/// The `/proc/sys/net/core/wmem_max` limit jsoncomm senders use to pick the memfd path (64000 if unknown).
/// Read once, not five syscalls per request; a limit lowered later
/// is still met, as the sender falls back to the memfd on EMSGSIZE.
pub fn wmem_max() -> usize {
    static WMEM_MAX: AtomicUsize = AtomicUsize::new(0);
    match WMEM_MAX.load(Ordering::Relaxed) {
        0 => {
            let read = std::fs::read_to_string("/proc/sys/net/core/wmem_max").ok().and_then(|s| s.trim().parse().ok());
            let limit = read.filter(|&n| n > 0).unwrap_or(64_000);
            WMEM_MAX.store(limit, Ordering::Relaxed);
            limit
        }
        limit => limit,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::io::AsFd;

    extern "C" fn ignore(_: libc::c_int) {}

    #[test]
    fn a_blocking_recv_survives_a_signal_without_sa_restart() {
        // A handler without SA_RESTART makes the kernel fail a blocked recvmsg with EINTR.
        // SAFETY: installs a handler that does nothing; SIGURG is otherwise unused by the test process.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = ignore as *const () as usize;
            assert_eq!(libc::sigaction(libc::SIGURG, &sa, std::ptr::null_mut()), 0);
        }
        let (a, b) = socketpair().unwrap();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let receiver = std::thread::spawn(move || {
            // SAFETY: pthread_self has no preconditions.
            tid_tx.send(unsafe { libc::pthread_self() }).unwrap();
            let mut buf = [0u8; 16];
            recv(b.as_fd(), &mut buf, 0).map(|p| buf[..p.len].to_vec())
        });
        let tid = tid_rx.recv().unwrap();
        for _ in 0..5 {
            std::thread::sleep(std::time::Duration::from_millis(30));
            // SAFETY: the thread is alive until joined below (it is blocked in recvmsg).
            unsafe { libc::pthread_kill(tid, libc::SIGURG) };
        }
        send(a.as_fd(), b"late", &[]).unwrap();
        assert_eq!(receiver.join().unwrap().unwrap(), b"late".to_vec());
    }

    #[test]
    fn fds_cross_a_socketpair_and_extras_are_refused_by_size() {
        let (a, b) = socketpair().unwrap();
        let f1 = std::fs::File::open("/dev/null").unwrap();
        let f2 = std::fs::File::open("/").unwrap();
        assert_eq!(send(a.as_fd(), b"hello", &[f1.as_fd(), f2.as_fd()]).unwrap(), 5);
        assert_eq!(peek_len(b.as_fd(), true).unwrap(), 5);
        let mut buf = [0u8; 16];
        let p = recv(b.as_fd(), &mut buf, 2).unwrap();
        assert_eq!(&buf[..p.len], b"hello");
        assert_eq!(p.fds.len(), 2);
        assert!(!p.truncated && !p.fds_truncated);
        let flags = nix::fcntl::fcntl(p.fds[0].as_raw_fd(), nix::fcntl::FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & libc::FD_CLOEXEC, 0, "received fds are close-on-exec");

        // Ten fds into room for one: the kernel drops what does not fit and says so.
        let many: Vec<_> = (0..10).map(|_| std::fs::File::open("/dev/null").unwrap()).collect();
        let borrowed: Vec<_> = many.iter().map(|f| f.as_fd()).collect();
        send(a.as_fd(), b"x", &borrowed).unwrap();
        let p = recv(b.as_fd(), &mut buf, 1).unwrap();
        assert!(p.fds_truncated);
        assert!(p.fds.len() < 10);
    }

    #[test]
    fn disarm_takes_plain_packets_and_stops_at_one_with_fds() {
        let (a, b) = socketpair().unwrap();
        assert_eq!(disarm(b.as_fd(), EVERY_PACKET), Leftover::Nothing, "an empty queue");
        assert!(send(a.as_fd(), b"late", &[]).unwrap_err().is(Errno::EPIPE), "shut for reading");

        // The peer hung up without reading what we sent: that is ECONNRESET once, not something queued.
        let (a, b) = socketpair().unwrap();
        send(b.as_fd(), b"reply", &[]).unwrap();
        drop(a);
        assert_eq!(disarm(b.as_fd(), EVERY_PACKET), Leftover::Nothing);

        let (a, b) = socketpair().unwrap();
        send(a.as_fd(), b"", &[]).unwrap();
        send(a.as_fd(), b"plain", &[]).unwrap();
        assert_eq!(disarm(b.as_fd(), EVERY_PACKET), Leftover::Nothing, "an empty packet is not the end of the queue");
        let mut buf = [0u8; 16];
        assert_eq!(recv(b.as_fd(), &mut buf, 0).unwrap().len, 0, "both taken");

        let (a, b) = socketpair().unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        send(a.as_fd(), b"plain", &[]).unwrap();
        send(a.as_fd(), b"", &[null.as_fd()]).unwrap();
        send(a.as_fd(), b"after", &[]).unwrap();
        assert_eq!(disarm(b.as_fd(), EVERY_PACKET), Leftover::Fds);
        // Credentials would take the room of the fd below.
        socket::setsockopt(b.as_raw_fd(), socket::sockopt::PassCred, &false).unwrap();
        let p = recv(b.as_fd(), &mut buf, 1).unwrap();
        assert_eq!((p.len, p.fds.len()), (0, 1), "the packet with the fd is still queued, its fd not taken");
        let n = recv(b.as_fd(), &mut buf, 0).unwrap().len;
        assert_eq!(&buf[..n], b"after");
    }

    #[test]
    fn disarm_stops_after_most_packets_and_says_more_may_follow() {
        let (a, b) = socketpair().unwrap();
        for _ in 0..5 {
            send(a.as_fd(), b"", &[]).unwrap();
        }
        assert_eq!(disarm(b.as_fd(), 3), Leftover::More);
        assert_eq!(disarm(b.as_fd(), 3), Leftover::Nothing, "two were left, then the end");

        let (a, b) = socketpair().unwrap();
        for _ in 0..3 {
            send(a.as_fd(), b"", &[]).unwrap();
        }
        assert_eq!(disarm(b.as_fd(), 3), Leftover::Nothing, "exactly `most`, then the end: nothing more");

        let (a, b) = socketpair().unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        send(a.as_fd(), b"", &[]).unwrap();
        send(a.as_fd(), b"", &[null.as_fd()]).unwrap();
        assert_eq!(disarm(b.as_fd(), 1), Leftover::Fds, "the packet after the last taken has fds");
    }

    #[test]
    fn a_reset_is_retried_by_a_take_as_by_a_peek() {
        // The peer queued a packet, then hung up without reading ours: the next receive, here a take (disarm
        // takes what it has just peeked), reports ECONNRESET once.
        let (a, b) = socketpair().unwrap();
        socket::setsockopt(b.as_raw_fd(), socket::sockopt::PassCred, &true).unwrap();
        send(b.as_fd(), b"reply", &[]).unwrap();
        send(a.as_fd(), b"plain", &[]).unwrap();
        drop(a);
        assert_eq!(credentials_only(b.as_fd(), false), Ok(Head::Plain));
        assert_eq!(credentials_only(b.as_fd(), true), Ok(Head::Empty));
    }

    #[test]
    fn a_long_packet_is_reported_truncated() {
        let (a, b) = socketpair().unwrap();
        send(a.as_fd(), &[7u8; 100], &[]).unwrap();
        assert_eq!(peek_len(b.as_fd(), true).unwrap(), 100);
        let mut buf = [0u8; 10];
        let p = recv(b.as_fd(), &mut buf, 0).unwrap();
        assert!(p.truncated);
        assert_eq!(p.len, 10);
        drop(a);
        assert_eq!(peek_len(b.as_fd(), true).unwrap(), 0, "closed peer reads as an empty packet");
    }

    #[test]
    fn peer_credentials_are_ours_on_a_pair() {
        let (a, _b) = socketpair().unwrap();
        let cred = peer_cred(a.as_fd()).unwrap();
        assert_eq!(cred.uid, nix::unistd::geteuid().as_raw());
        assert_eq!(cred.pid, std::process::id() as i32);
    }

    #[test]
    fn long_paths_bind_through_proc() {
        let dir = std::env::temp_dir().join(format!("loopdev-seqpacket-{}-{}", std::process::id(), "d".repeat(120)));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sock");
        let s = socket(false).unwrap();
        bind(s.as_fd(), &path).unwrap();
        listen(s.as_fd(), 4).unwrap();
        let c = socket(false).unwrap();
        bind_auto(c.as_fd()).unwrap();
        connect(c.as_fd(), &path).unwrap();
        let conn = accept(s.as_fd()).unwrap();
        send(c.as_fd(), b"hi", &[]).unwrap();
        let mut buf = [0u8; 4];
        let mut pfd = [pollfd(conn.as_fd(), libc::POLLIN)];
        poll(&mut pfd, 5000).unwrap();
        assert_eq!(recv(conn.as_fd(), &mut buf, 0).unwrap().len, 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
