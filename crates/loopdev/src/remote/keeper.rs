//! Where a uid's hung-up connections that still hold its fds wait to be closed: an fd table of their own,
//! not the server's.
//!
//! Closing such a connection releases the fds queued on it, and the peer decides what that costs: any user
//! can make the release block for good, without privilege (write ends of a pipe whose lock its own splice
//! thread holds; a FUSE file). A wedged closing thread then kept every later connection of that peer in
//! the server's fd table, one fd each, up to the point where the server stopped accepting for everyone.
//!
//! A keeper is a thread that gave itself an empty fd table (`close_range(CLOSE_RANGE_UNSHARE)` from 0) and
//! a closing thread that shares it. The poll thread asks the keeper to take a copy of a connection
//! (`pidfd_getfd`, which never blocks), then closes its own: a socket has no flush and ours is no longer
//! the last reference, so that close cannot block either. The last close is the closing thread's, in the
//! keeper's table. If it wedges, what piles up is there, bounded by the fds the peer can have in flight
//! (its `RLIMIT_NOFILE`) and by our own fd limit per table; the server's table is untouched. Past either,
//! or on a kernel without `pidfd_getfd` (before 5.6), the connection goes to the closing lane as before.

use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};

enum Ask {
    /// Copy this fd of the server's table.
    Take(RawFd),
    /// The server closed its own: the copy is now the last reference, to be closed.
    Released,
}

pub(super) struct Keeper {
    take: mpsc::Sender<Ask>,
    taken: mpsc::Receiver<bool>,
    /// Connections in the keeper's table not closed yet.
    held: Arc<AtomicUsize>,
}

impl Keeper {
    /// The keeper thread and its closing thread, once both run in their own table; None if either cannot be
    /// started (no thread to be had, a kernel without these calls), to be tried again later.
    pub fn start(name: &str) -> Option<Keeper> {
        let (take, requests) = mpsc::channel::<Ask>();
        let (answer, taken) = mpsc::channel::<bool>();
        let ready = answer.clone();
        let held = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&held);
        let closer_name = name.replacen("keep", "kclose", 1);
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let pidfd = match own_table() {
                    Some(pidfd) => pidfd,
                    None => return, // `ready` is dropped unsent: `start` says None
                };
                // Started after the unshare, so it shares this thread's table, not the server's.
                let (close, closing) = mpsc::channel::<OwnedFd>();
                let left = Arc::clone(&count);
                let started = std::thread::Builder::new().name(closer_name).spawn(move || {
                    for sock in closing {
                        drop(sock);
                        left.fetch_sub(1, Ordering::SeqCst);
                    }
                });
                if started.is_err() || ready.send(true).is_err() {
                    return;
                }
                drop(ready);
                let mut copy = None;
                for ask in requests {
                    match ask {
                        Ask::Take(fd) => {
                            copy = copy_of(pidfd.as_raw_fd(), fd);
                            if answer.send(copy.is_some()).is_err() {
                                return;
                            }
                        }
                        Ask::Released => {
                            if let Some(last) = copy.take() {
                                count.fetch_add(1, Ordering::SeqCst);
                                if let Err(mpsc::SendError(last)) = close.send(last) {
                                    std::mem::forget(last); // closing thread gone: left to the table
                                }
                            }
                        }
                    }
                }
            })
            .ok()?;
        if taken.recv() != Ok(true) {
            return None;
        }
        Some(Keeper { take, taken, held })
    }

    /// Closes `sock` here, its last close in the keeper's table; back to the caller if the keeper could not
    /// take a copy. Our close comes first, so the keeper's copy is the last reference when it is closed.
    pub fn close(&self, sock: OwnedFd) -> std::result::Result<(), OwnedFd> {
        let taken = self.take.send(Ask::Take(sock.as_raw_fd())).is_ok() && self.taken.recv().unwrap_or(false);
        if !taken {
            return Err(sock);
        }
        drop(sock);
        let _ = self.take.send(Ask::Released);
        Ok(())
    }

    /// Connections waiting in the keeper's table.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }
}

/// In the keeper thread: an empty fd table of its own, and a pidfd of our process to copy fds from.
fn own_table() -> Option<OwnedFd> {
    // SAFETY: plain system calls with integer arguments; the results are checked.
    unsafe {
        if libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, libc::CLOSE_RANGE_UNSHARE) != 0 {
            return None;
        }
        let pidfd = libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0u32);
        if pidfd < 0 {
            return None;
        }
        Some(OwnedFd::from_raw_fd(pidfd as RawFd))
    }
}

/// `fd` of the process's (the server's) table, copied into the calling thread's.
fn copy_of(pidfd: RawFd, fd: RawFd) -> Option<OwnedFd> {
    // SAFETY: integer arguments; a non-negative result is a new fd that nothing else owns.
    let copy = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0u32) };
    // SAFETY: as above.
    (copy >= 0).then(|| unsafe { OwnedFd::from_raw_fd(copy as RawFd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::io::AsFd;
    use std::time::Duration;

    /// A pipe write end whose release blocks for as long as this process lives: its pipe's lock is held by
    /// a thread splicing into a full socket nobody reads (the read end and both sockets are leaked for it).
    fn wedging_pipe_end() -> OwnedFd {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two fds pipe2 writes.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: pipe2 just returned both fds.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        while std::io::Write::write(&mut &a, &[0u8; 65536]).is_ok() {}
        a.set_nonblocking(false).unwrap();
        nix::unistd::write(w.as_raw_fd(), &[b'y'; 4096]).unwrap();
        let (from, to) = (r.as_raw_fd(), a.as_raw_fd());
        std::mem::forget((r, a, b));
        let (tid_tx, tid) = mpsc::channel();
        std::thread::spawn(move || {
            // SAFETY: no arguments.
            tid_tx.send(unsafe { libc::gettid() }).unwrap();
            // SAFETY: integer arguments; both fds stay open for as long as this process lives.
            unsafe { libc::splice(from, std::ptr::null_mut(), to, std::ptr::null_mut(), 4096, 0) };
        });
        // Locked once the thread waits for room in the socket, holding the pipe's lock (a fixed wait was not
        // always long enough on a loaded machine).
        let wchan = format!("/proc/self/task/{}/wchan", tid.recv().unwrap());
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&wchan).unwrap_or_default().contains("sock") {
            assert!(std::time::Instant::now() < deadline, "the splice thread never waited for the socket");
            std::thread::sleep(Duration::from_millis(5));
        }
        w
    }

    #[test]
    fn a_connection_whose_close_blocks_waits_in_the_keepers_table_not_ours() {
        let end = wedging_pipe_end();
        let keeper = Keeper::start("loopdev-keep-test").unwrap();
        let (ours, peers) = super::super::seqpacket::socketpair().unwrap();
        super::super::seqpacket::send(peers.as_fd(), b"x", &[end.as_fd()]).unwrap();
        drop(end);
        drop(peers);
        let (done_tx, done) = mpsc::channel();
        let keeping = std::thread::spawn(move || {
            let kept = keeper.close(ours).is_ok();
            done_tx.send(kept).unwrap();
            keeper
        });
        assert_eq!(done.recv_timeout(Duration::from_secs(5)), Ok(true), "our close waited for the pipe's lock");
        let keeper = keeping.join().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(keeper.held(), 1, "the keeper's close is the one that waits");
    }
}
