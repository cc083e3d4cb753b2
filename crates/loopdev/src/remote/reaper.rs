//! The last close of what a peer sent, made by a thread that is exiting, so that the peer cannot make it wait.
//!
//! A peer decides what happens when we close its fds last. A TCP socket with `SO_LINGER` and unsent data to a
//! receiver that never reads blocks that close for as long as the peer likes, and so does closing a
//! connection that has such a socket queued on it; a thread waiting so holds up everything queued behind it.
//! socket(7): "When the socket is closed as part of exit(2), it always lingers in the background." So a
//! reaper thread gives itself an fd table of its own (`close_range(CLOSE_RANGE_UNSHARE)` from 0, which copies
//! none of ours), takes copies of the fds (`pidfd_getfd`), the caller closes ours (no longer the last
//! references), and the reaper exits: its exit makes the last closes, which do not wait.
//!
//! What an exiting thread still waits for, no signal ends either: a FUSE file's writeback or release, for
//! a peer that can mount FUSE. A reaper wedged so is left behind; a lane with `MAX_LIVE` reapers not gone
//! yet closes by itself, as it did before reapers (see README, "Not guaranteed"). A kernel without
//! `pidfd_getfd` (before 5.6) gets that too.

use std::os::unix::io::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

/// Reapers of one lane that may be wedged before the lane stops starting more.
const MAX_LIVE: usize = 8;
/// A reaper only makes a few system calls.
const STACK: usize = 64 * 1024;
/// Set once the kernel said it cannot do what a reaper needs.
static UNSUPPORTED: AtomicBool = AtomicBool::new(false);

/// The reapers one closing lane started: a lane closes in order, one batch at a time.
#[derive(Debug, Default)]
pub(super) struct Reapers {
    /// Thread ids of reapers that had not finished exiting when last looked at.
    live: Vec<libc::pid_t>,
}

impl Reapers {
    /// Closes `fds`, with their last closes (if ours) made by an exiting reaper: this returns at once even
    /// when the peer made those closes block. Closes them here if none of them is a socket (only a socket's
    /// close is spared by an exit) or if no reaper can be had.
    pub fn close(&mut self, fds: Vec<OwnedFd>) {
        if !fds.iter().any(is_socket) || UNSUPPORTED.load(Ordering::Relaxed) || !self.room() {
            return drop(fds);
        }
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let (taken_tx, taken) = mpsc::channel::<Option<libc::pid_t>>();
        let (go, go_rx) = mpsc::channel::<()>();
        let spawned = std::thread::Builder::new().name("loopdev-reap".into()).stack_size(STACK).spawn(move || {
            let tid = take_copies(&raw).then(gettid);
            let _ = taken_tx.send(tid);
            // Ours must be closed first, so that the last references are these copies.
            let _ = go_rx.recv();
            // Returning exits the thread; the kernel then closes its fd table, copies and all.
        });
        let tid = match spawned {
            Ok(_) => taken.recv().ok().flatten(),
            Err(_) => None,
        };
        drop(fds);
        drop(go);
        self.live.extend(tid);
    }

    /// Whether another reaper may be started: waits a little for exiting ones before saying no.
    fn room(&mut self) -> bool {
        for _ in 0..10 {
            self.live.retain(|&tid| alive(tid));
            if self.live.len() < MAX_LIVE {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }
}

/// In a reaper: a table of its own, with copies of `fds` from the process's table in it. Never closed by
/// us: the thread's exit closes them.
fn take_copies(fds: &[RawFd]) -> bool {
    // SAFETY: plain system calls with integer arguments; the results are checked.
    unsafe {
        if libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, libc::CLOSE_RANGE_UNSHARE) != 0 {
            return unsupported();
        }
        let pidfd = libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0u32);
        if pidfd < 0 {
            return unsupported();
        }
        let all = fds.iter().all(|&fd| libc::syscall(libc::SYS_pidfd_getfd, pidfd as RawFd, fd, 0u32) >= 0);
        if !all && *libc::__errno_location() == libc::ENOSYS {
            UNSUPPORTED.store(true, Ordering::Relaxed);
        }
        libc::close(pidfd as RawFd);
        all
    }
}

fn unsupported() -> bool {
    // SAFETY: reads this thread's errno.
    let errno = unsafe { *libc::__errno_location() };
    if errno == libc::ENOSYS || errno == libc::EINVAL {
        UNSUPPORTED.store(true, Ordering::Relaxed);
    }
    false
}

/// Asks the socket layer only (SO_TYPE), never the file's filesystem, which may be a peer's FUSE daemon.
fn is_socket(fd: &OwnedFd) -> bool {
    let mut kind: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `kind` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            &mut kind as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    rc == 0
}

fn gettid() -> libc::pid_t {
    // SAFETY: gettid takes no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as libc::pid_t }
}

/// Whether the thread `tid` of this process has not finished exiting (its fd table may still be closing).
fn alive(tid: libc::pid_t) -> bool {
    // SAFETY: signal 0 only checks that the thread exists in our thread group.
    unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, 0) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::os::unix::io::{AsFd, FromRawFd, IntoRawFd};

    /// A TCP socket whose last close blocks for as long as it likes: SO_LINGER with unsent data to a
    /// receiver that never reads (the listener's accepted end, returned to keep it open).
    fn lingering() -> (OwnedFd, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (receiver, _) = listener.accept().unwrap();
        c.set_nonblocking(true).unwrap();
        let chunk = vec![0u8; 65536];
        for _ in 0..3 {
            while c.write(&chunk).is_ok() {}
            std::thread::sleep(Duration::from_millis(100));
        }
        let linger = libc::linger { l_onoff: 1, l_linger: 1_000_000 };
        // SAFETY: passes a valid linger struct and its size.
        let rc = unsafe {
            libc::setsockopt(
                c.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                &linger as *const libc::linger as *const libc::c_void,
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
        // SAFETY: the stream's fd is handed over whole.
        (unsafe { OwnedFd::from_raw_fd(c.into_raw_fd()) }, receiver)
    }

    #[test]
    fn a_lingering_socket_queued_on_a_connection_does_not_hold_up_its_close() {
        let (ours, peers) = super::super::seqpacket::socketpair().unwrap();
        let (sock, _receiver) = lingering();
        super::super::seqpacket::send(peers.as_fd(), b"x", &[sock.as_fd()]).unwrap();
        drop(sock);
        drop(peers);
        // `ours` now holds the last reference to the lingering socket, in its queue.
        let (done_tx, done) = mpsc::channel();
        std::thread::spawn(move || {
            Reapers::default().close(vec![ours]);
            done_tx.send(()).unwrap();
        });
        assert!(done.recv_timeout(Duration::from_secs(5)).is_ok(), "the close waited for the peer's socket");
    }

    #[test]
    fn a_lingering_socket_itself_does_not_hold_up_its_close() {
        let (sock, _receiver) = lingering();
        let (done_tx, done) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reapers = Reapers::default();
            reapers.close(vec![sock]);
            done_tx.send(reapers.live.len()).unwrap();
        });
        assert_eq!(done.recv_timeout(Duration::from_secs(5)), Ok(1), "the close waited for the socket");
    }

    #[test]
    fn files_that_are_not_sockets_are_closed_without_a_reaper() {
        let mut reapers = Reapers::default();
        reapers.close(vec![std::fs::File::open("/dev/null").unwrap().into()]);
        assert!(reapers.live.is_empty());
    }
}
