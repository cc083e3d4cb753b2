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
//! D1). Only a socket the keeper will not take (its uid's keeper is wedged) comes back for a full drain.

use super::seqpacket::{self, Leftover};
use crate::error::{Error, Result};
use nix::errno::Errno;
use std::os::unix::io::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};

/// A peer's uid, its socket, and how many packets to take off it.
type Job = (u32, OwnedFd, usize);
/// What comes back: a socket with fds or more packets left on it.
type Back = (u32, OwnedFd, Leftover);

/// Packets taken off a socket before it is handed back as `Leftover::More`: a client that follows the
/// protocol leaves at most one unanswered request on it.
const FIRST_PASS: usize = 64;

/// Sockets waiting for the drainer beyond which the server accepts no more until it catches up: each may
/// hold a queue of several MiB, kept in memory by our fd (the peer pays for the sends, but while it floods,
/// accept would otherwise run far ahead of the drainer).
const MAX_WAITING: usize = 64;

pub(super) struct Drainer {
    tx: mpsc::Sender<Job>,
    /// Taken by `rest` at the end: dropping it with sockets in it would close them on the dropping thread.
    back: Option<mpsc::Receiver<Back>>,
    /// Signalled when a socket is handed back.
    ready: Arc<OwnedFd>,
    /// Sockets given to the drainer and not closed or taken back yet: they are in our fd table.
    waiting: Arc<AtomicUsize>,
}

impl Drainer {
    pub fn new() -> Result<Drainer> {
        let (tx, rx) = mpsc::channel::<Job>();
        let (back_tx, back) = mpsc::channel::<Back>();
        let ready = Arc::new(seqpacket::eventfd()?);
        let waiting = Arc::new(AtomicUsize::new(0));
        let (signal, count) = (Arc::clone(&ready), Arc::clone(&waiting));
        std::thread::Builder::new()
            .name("loopdev-drain".into())
            .spawn(move || {
                for (uid, sock, most) in rx {
                    match seqpacket::disarm(sock.as_fd(), most) {
                        Leftover::Nothing => {
                            drop(sock);
                            count.fetch_sub(1, Ordering::SeqCst);
                        }
                        // With the poll thread gone, closing it here can only hold up this thread.
                        left => {
                            if back_tx.send((uid, sock, left)).is_ok() {
                                let _ = seqpacket::eventfd_signal(signal.as_fd());
                            }
                        }
                    }
                }
            })
            .map_err(|e| Error::os(e.raw_os_error().map_or(Errno::EAGAIN, Errno::from_i32), "pthread_create"))?;
        Ok(Drainer { tx, back: Some(back), ready, waiting })
    }

    /// Gives `sock` (of a peer with `uid`) to the drainer for a first pass; back to the caller if the drainer
    /// is gone.
    pub fn drain(&self, uid: u32, sock: OwnedFd) -> std::result::Result<(), OwnedFd> {
        self.give(uid, sock, FIRST_PASS)
    }

    /// Like `drain`, taking every packet there is: for a socket that came back `More` and that nobody
    /// else will close.
    pub fn drain_fully(&self, uid: u32, sock: OwnedFd) -> std::result::Result<(), OwnedFd> {
        self.give(uid, sock, seqpacket::EVERY_PACKET)
    }

    fn give(&self, uid: u32, sock: OwnedFd, most: usize) -> std::result::Result<(), OwnedFd> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        self.tx.send((uid, sock, most)).map_err(|mpsc::SendError((_, sock, _))| {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            sock
        })
    }

    /// Readable when sockets were handed back (`take_back`).
    pub fn ready_fd(&self) -> BorrowedFd<'_> {
        self.ready.as_fd()
    }

    /// The sockets handed back since the last call, with their peer's uid and what is left on them.
    pub fn take_back(&self) -> Vec<Back> {
        seqpacket::eventfd_take(self.ready.as_fd());
        let back: Vec<Back> = self.back.as_ref().map_or_else(Vec::new, |b| b.try_iter().collect());
        self.waiting.fetch_sub(back.len(), Ordering::SeqCst);
        back
    }

    /// At the end: what is handed back from now on, as something to drop where blocking does no harm (a
    /// closing lane). Once the drainer itself is dropped, it finishes its queue and stops.
    pub fn rest(&mut self) -> Rest {
        Rest(self.back.take())
    }

    /// Sockets given to the drainer and still in our fd table.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Whether so many sockets wait for the drainer that no more should be accepted for now.
    pub fn full(&self) -> bool {
        self.waiting() >= MAX_WAITING
    }
}

/// The hand-back channel, once the server is done: held only to be dropped, which closes whatever it
/// still holds.
pub(super) struct Rest(#[allow(dead_code)] Option<mpsc::Receiver<Back>>);
