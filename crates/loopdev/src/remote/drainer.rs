//! Draining the sockets of peers we are done with, off the poll thread (see `seqpacket::disarm`). A peer can
//! stuff a socket's queue with as many empty packets as its send buffer holds, and taking them costs as many
//! receives: on the poll thread, a few processes doing that slowed every reply down to seconds. The drainer
//! closes a socket that has nothing of the peer's left on it (that close cannot block) and hands one that
//! still holds fds back to the poll thread, for its uid's keeper.
//!
//! A first pass takes at most `FIRST_PASS` packets: a socket with more is handed back as well, for its uid's
//! keeper to close (the kernel frees the queue then, at no cost per packet to us). Taking every packet here
//! made us pay two receives for each send of the peer's, and four processes of one uid kept this thread so
//! far behind that the server stopped accepting, root's connections too, for seconds (red team round 14,
//! D1). Only a socket the keeper will not take (its uid's keeper is wedged) comes back for a full drain, on
//! a thread of its own that accept does not wait for.

use super::seqpacket::{self, Leftover};
use crate::error::{Error, Result};
use nix::errno::Errno;
use std::os::unix::io::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};

/// A peer's uid and its socket.
type Job = (u32, OwnedFd);
/// What comes back: a socket with fds or more packets left on it.
type Back = (u32, OwnedFd, Leftover);

/// Packets taken off a socket before it is handed back as `Leftover::More`: a client that follows the
/// protocol leaves at most one unanswered request on it.
const FIRST_PASS: usize = 64;

/// Sockets waiting for a first pass beyond which the server accepts no more until it catches up: each may
/// hold a queue of several MiB, kept in memory by our fd (the peer pays for the sends, but while it floods,
/// accept would otherwise run far ahead of the drainer).
const MAX_WAITING: usize = 64;

/// One draining thread and what waits for it.
struct Pass {
    tx: mpsc::Sender<Job>,
    /// Sockets given to this thread and not closed or handed back yet: they are in our fd table.
    waiting: Arc<AtomicUsize>,
}

pub(super) struct Drainer {
    /// First passes, which the accept gate (`full`) waits for: each takes at most `FIRST_PASS` packets.
    first: Pass,
    /// Full drains, on a thread of their own: a peer that makes them take long (it wedged its keeper and
    /// stuffs connection after connection) holds up only them, not accept (red team round 15, B: root's
    /// new connections waited 2.4-6.5 s while they shared the first pass's thread).
    full: Pass,
    /// Taken by `rest` at the end: dropping it with sockets in it would close them on the dropping thread.
    back: Option<mpsc::Receiver<Back>>,
    /// Signalled when a socket is handed back.
    ready: Arc<OwnedFd>,
    /// Sockets handed back and not taken yet.
    returned: Arc<AtomicUsize>,
}

impl Pass {
    fn start(
        name: &str,
        most: usize,
        back: &mpsc::Sender<Back>,
        ready: &Arc<OwnedFd>,
        returned: &Arc<AtomicUsize>,
    ) -> Result<Pass> {
        let (tx, rx) = mpsc::channel::<Job>();
        let waiting = Arc::new(AtomicUsize::new(0));
        let (back, signal, count, returned) =
            (back.clone(), Arc::clone(ready), Arc::clone(&waiting), Arc::clone(returned));
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                for (uid, sock) in rx {
                    let left = seqpacket::disarm(sock.as_fd(), most);
                    if left == Leftover::Nothing {
                        drop(sock);
                    } else {
                        returned.fetch_add(1, Ordering::SeqCst);
                        // With the poll thread gone, closing it here can only hold up this thread.
                        if back.send((uid, sock, left)).is_ok() {
                            let _ = seqpacket::eventfd_signal(signal.as_fd());
                        }
                    }
                    count.fetch_sub(1, Ordering::SeqCst);
                }
            })
            .map_err(|e| Error::os(e.raw_os_error().map_or(Errno::EAGAIN, Errno::from_i32), "pthread_create"))?;
        Ok(Pass { tx, waiting })
    }

    fn give(&self, uid: u32, sock: OwnedFd) -> std::result::Result<(), OwnedFd> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        self.tx.send((uid, sock)).map_err(|mpsc::SendError((_, sock))| {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            sock
        })
    }

    fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }
}

impl Drainer {
    pub fn new() -> Result<Drainer> {
        let (back_tx, back) = mpsc::channel::<Back>();
        let ready = Arc::new(seqpacket::eventfd()?);
        let returned = Arc::new(AtomicUsize::new(0));
        let first = Pass::start("loopdev-drain", FIRST_PASS, &back_tx, &ready, &returned)?;
        let full = Pass::start("loopdev-drainall", seqpacket::EVERY_PACKET, &back_tx, &ready, &returned)?;
        Ok(Drainer { first, full, back: Some(back), ready, returned })
    }

    /// Gives `sock` (of a peer with `uid`) to the drainer for a first pass; back to the caller if the drainer
    /// is gone.
    pub fn drain(&self, uid: u32, sock: OwnedFd) -> std::result::Result<(), OwnedFd> {
        self.first.give(uid, sock)
    }

    /// Like `drain`, taking every packet there is: for a socket that came back `More` and that nobody
    /// else will close.
    pub fn drain_fully(&self, uid: u32, sock: OwnedFd) -> std::result::Result<(), OwnedFd> {
        self.full.give(uid, sock)
    }

    /// Readable when sockets were handed back (`take_back`).
    pub fn ready_fd(&self) -> BorrowedFd<'_> {
        self.ready.as_fd()
    }

    /// The sockets handed back since the last call, with their peer's uid and what is left on them.
    pub fn take_back(&self) -> Vec<Back> {
        seqpacket::eventfd_take(self.ready.as_fd());
        let back: Vec<Back> = self.back.as_ref().map_or_else(Vec::new, |b| b.try_iter().collect());
        self.returned.fetch_sub(back.len(), Ordering::SeqCst);
        back
    }

    /// At the end: what is handed back from now on, as something to drop where blocking does no harm (a
    /// closing lane). Once the drainer itself is dropped, it finishes its queue and stops.
    pub fn rest(&mut self) -> Rest {
        Rest(self.back.take())
    }

    /// Sockets given to the drainer and still in our fd table.
    pub fn waiting(&self) -> usize {
        self.first.waiting() + self.full.waiting() + self.returned.load(Ordering::SeqCst)
    }

    /// Whether so many sockets wait for a first pass that no more should be accepted for now.
    pub fn full(&self) -> bool {
        self.first.waiting() >= MAX_WAITING
    }
}

/// The hand-back channel, once the server is done: held only to be dropped, which closes whatever it
/// still holds.
pub(super) struct Rest(#[allow(dead_code)] Option<mpsc::Receiver<Back>>);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::seqpacket::{send, socketpair};
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    use std::os::unix::io::AsRawFd;
    use std::time::{Duration, Instant};

    /// Red team round 15, B: full drains shared the first pass's thread, and a peer that made many of them
    /// kept it, and with it accept, behind for seconds.
    #[test]
    fn full_drains_hold_up_neither_first_passes_nor_accept() {
        let drainer = Drainer::new().unwrap();
        // Every queue is stuffed before the first is given: filled one by one, the full drains kept pace with
        // the filling on the other CPU and were done before the first pass was asked for (1 run in 10).
        let mut peers = Vec::new();
        let mut stuffed = Vec::new();
        for _ in 0..2 * MAX_WAITING {
            let (theirs, ours) = socketpair().unwrap();
            let flags = OFlag::from_bits_truncate(fcntl(theirs.as_raw_fd(), FcntlArg::F_GETFL).unwrap());
            fcntl(theirs.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).unwrap();
            while send(theirs.as_fd(), b"", &[]).is_ok() {} // its send buffer full
            peers.push(theirs);
            stuffed.push(ours);
        }
        for ours in stuffed {
            drainer.drain_fully(1000, ours).unwrap();
        }
        assert!(!drainer.full(), "full drains do not close the accept gate");
        let (theirs, ours) = socketpair().unwrap();
        send(theirs.as_fd(), b"", &[]).unwrap();
        let start = Instant::now();
        drainer.drain(0, ours).unwrap();
        // Closed by the first pass once it took the packet: the peer's next send is refused.
        while send(theirs.as_fd(), b"", &[]).is_ok() {
            assert!(start.elapsed() < Duration::from_secs(5), "the first pass was not made");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(drainer.full.waiting() > 0, "it went before the full drains were done (else this proves nothing)");
        let deadline = Instant::now() + Duration::from_secs(30);
        while drainer.waiting() > 0 {
            assert!(Instant::now() < deadline, "the full drains did not finish");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
