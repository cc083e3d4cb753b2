//! Closing what peers sent, off the poll thread. The last close of a peer's socket can block for as long as
//! the peer likes (SO_LINGER with unsent data to a receiver that never reads; a FUSE file's flush), and
//! closing a connection also closes every fd still queued on it. So the poll thread never drops a peer's fd
//! or a connection itself: it hands them here. Each uid has a lane (a thread) of its own, so a peer can only
//! hold up its own closes; uids beyond `MAX_LANES` share one.
//!
//! A wedged lane keeps what is queued on it open, in our fd table: the server asks `backlog` and stops
//! reading from a uid whose lane holds too much, and stops accepting while all lanes together do.
//!
//! A peer's socket is closed at once, by the drainer (see `drainer`), if nothing of the peer's is queued on
//! it: a peer can open as many connections as it likes, and those that hold no fds must not pile up on its
//! lane. One that still holds fds goes to the uid's keeper (see `keeper`), whose last close is made in an fd
//! table of its own; to the lane like any fd only if the keeper cannot take it. How many a peer can make
//! is bounded by its own fds in flight, which the kernel limits to the peer's `RLIMIT_NOFILE`.
//! (Parking such sockets in the kernel instead, in flight through a socket pair of ours, was tried and
//! reverted: the parked sockets counted against every root process's fds in flight, host-wide.)

use super::drainer::{Drainer, Rest};
use super::keeper::Keeper;
use super::seqpacket::{self, Leftover};
use crate::error::{Error, Result};
use nix::errno::Errno;
use std::collections::{HashMap, HashSet};
use std::os::unix::io::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};

const MAX_LANES: usize = 64;
/// Connections a keeper may hold before a socket with only packets without fds queued is drained instead
/// of given to it: each pins its queue, up to twice wmem_max, for as long as the keeper's closes are stuck.
const KEEPER_UNDRAINED: usize = 64;
/// The shared lane, for uids beyond `MAX_LANES` and for sockets whose peer is unknown.
pub(super) const ANY_UID: u32 = u32::MAX;

type Droppable = Box<dyn Send>;

/// What a lane closes, and how many fds of ours it holds until then (the lane's backlog counts those).
pub(super) trait Closable: Send + 'static {
    fn fds(&self) -> usize;
}

impl Closable for std::os::unix::io::OwnedFd {
    fn fds(&self) -> usize {
        1
    }
}

impl Closable for Vec<std::os::unix::io::OwnedFd> {
    fn fds(&self) -> usize {
        self.len()
    }
}

struct Lane {
    tx: mpsc::Sender<(Droppable, usize)>,
    /// Fds queued on this lane and not closed yet.
    pending: Arc<AtomicUsize>,
}

pub(super) struct Closer {
    lanes: HashMap<u32, Lane>,
    /// Uids whose fds went to the shared lane (no lane of their own could be had): the shared lane's
    /// backlog counts against them, and only against them. Forgotten once that lane is empty.
    on_shared: HashSet<u32>,
    /// Per uid, like the lanes.
    keepers: HashMap<u32, Keeper>,
    /// Fds queued on all lanes and not closed yet.
    total: Arc<AtomicUsize>,
    drainer: Drainer,
}

impl Closable for Rest {
    fn fds(&self) -> usize {
        0
    }
}

impl Drop for Closer {
    /// What the drainer hands back from now on is dropped on the shared lane, never here.
    fn drop(&mut self) {
        self.take_drained();
        let rest = self.drainer.rest();
        self.close(ANY_UID, rest);
    }
}

impl Closer {
    /// A closer with its drainer, its shared lane and its shared keeper started, so that a later shortage of
    /// threads still has a lane and a keeper to use. (Only a kernel without `pidfd_getfd` has no keeper.)
    /// The uids in `own_lanes` get their lanes now too: a peer that takes every pid and wedges the shared
    /// lane then still cannot make them share it (red team round 12).
    pub fn new(own_lanes: &[u32]) -> Result<Closer> {
        let mut closer = Closer {
            lanes: HashMap::new(),
            on_shared: HashSet::new(),
            keepers: HashMap::new(),
            total: Arc::default(),
            drainer: Drainer::new()?,
        };
        closer.lane(ANY_UID).ok_or_else(|| Error::os(Errno::EAGAIN, "pthread_create"))?;
        for &uid in own_lanes.iter().take(MAX_LANES / 2) {
            let _ = closer.lane(uid);
        }
        if let Some(keeper) = Keeper::start(&format!("loopdev-keep-{ANY_UID}")) {
            closer.keepers.insert(ANY_UID, keeper);
        }
        Ok(closer)
    }

    /// Drops `what` on `uid`'s lane; on the shared lane if no thread can be started for it (the system is
    /// out of them). Only if the shared lane is gone too is it dropped here: there is no better place left.
    pub fn close(&mut self, uid: u32, what: impl Closable) {
        let fds = what.fds();
        let peer = uid;
        let mut uid = if self.lanes.contains_key(&uid) || self.lanes.len() < MAX_LANES { uid } else { ANY_UID };
        if self.lane(uid).is_none() {
            uid = ANY_UID;
        }
        if uid == ANY_UID && peer != ANY_UID {
            self.on_shared.insert(peer);
        }
        let what: Droppable = Box::new(what);
        let total = Arc::clone(&self.total);
        let what = match self.lane(uid) {
            Some(lane) => {
                lane.pending.fetch_add(fds, Ordering::SeqCst);
                total.fetch_add(fds, Ordering::SeqCst);
                match lane.tx.send((what, fds)) {
                    Ok(()) => return,
                    Err(mpsc::SendError((what, _))) => {
                        lane.pending.fetch_sub(fds, Ordering::SeqCst);
                        total.fetch_sub(fds, Ordering::SeqCst);
                        what
                    }
                }
            }
            None => what,
        };
        self.lanes.remove(&uid);
        drop(what);
    }

    /// Closes a peer's socket: on the drainer if nothing of the peer's is queued on it (closing it cannot
    /// block), else through `uid`'s keeper (after `take_drained`). Disarmed here, as a last resort, if the
    /// drainer is gone.
    pub fn close_socket(&mut self, uid: u32, sock: OwnedFd) {
        if let Err(sock) = self.drainer.drain(uid, sock) {
            self.drain_here(uid, sock);
        }
    }

    fn drain_here(&mut self, uid: u32, sock: OwnedFd) {
        match seqpacket::disarm(sock.as_fd(), seqpacket::EVERY_PACKET) {
            Leftover::Nothing => drop(sock),
            Leftover::Fds | Leftover::More => self.keep(uid, sock),
        }
    }

    /// A socket that still holds the peer's fds: to `uid`'s keeper, else its lane.
    fn keep(&mut self, uid: u32, sock: OwnedFd) {
        let sock = match self.keeper(uid) {
            Some(keeper) => match keeper.close(sock) {
                Ok(()) => return,
                Err(sock) => sock,
            },
            None => sock,
        };
        self.close(uid, sock);
    }

    /// A socket with more packets queued than the drainer's first pass took, none with fds so far: closed
    /// by `uid`'s keeper (the kernel frees the queue), unless the keeper is behind, its closes perhaps
    /// wedged by the peer; then taking every packet is what keeps the socket (and the memory its queue
    /// pins) from waiting there.
    fn keep_or_drain(&mut self, uid: u32, sock: OwnedFd) {
        if self.keeper(uid).map_or(false, |k| k.held() < KEEPER_UNDRAINED) {
            return self.keep(uid, sock);
        }
        if let Err(sock) = self.drainer.drain_fully(uid, sock) {
            self.drain_here(uid, sock);
        }
    }

    /// `uid`'s keeper (started if need be), else the shared one.
    fn keeper(&mut self, uid: u32) -> Option<&Keeper> {
        let uid = if self.keepers.contains_key(&uid) || self.keepers.len() < MAX_LANES { uid } else { ANY_UID };
        if let std::collections::hash_map::Entry::Vacant(slot) = self.keepers.entry(uid) {
            // Tried again next time if no thread can be had now (the shared keeper stands in meanwhile): a
            // shortage (a peer taking every pid for a moment, red team round 10) must not cost the uid its
            // keeper for good.
            if let Some(keeper) = Keeper::start(&format!("loopdev-keep-{uid}")) {
                slot.insert(keeper);
            }
        }
        self.keepers.get(&uid).or_else(|| self.keepers.get(&ANY_UID))
    }

    /// Readable when the drainer handed sockets back: call `take_drained`.
    pub fn ready_fd(&self) -> BorrowedFd<'_> {
        self.drainer.ready_fd()
    }

    /// Whether so many sockets wait for the drainer that no more should be accepted for now.
    pub fn draining_full(&self) -> bool {
        self.drainer.full()
    }

    /// Hands the sockets the drainer found fds on to their uids' keepers (see `keep`), and those with more
    /// packets than it took too, or back for a full drain (`keep_or_drain`).
    pub fn take_drained(&mut self) {
        for (uid, sock, left) in self.drainer.take_back() {
            match left {
                Leftover::More => self.keep_or_drain(uid, sock),
                Leftover::Fds | Leftover::Nothing => self.keep(uid, sock),
            }
        }
    }

    /// Fds still waiting to be closed for `uid`: its lane's backlog, plus the shared lane's if some of its
    /// fds went there. A uid that never needed a lane has none (it used to be judged by the shared lane's,
    /// which a peer could wedge to stop root being read: red team round 12).
    pub fn backlog(&mut self, uid: u32) -> usize {
        let pending = |closer: &Closer, uid| closer.lanes.get(&uid).map_or(0, |l| l.pending.load(Ordering::SeqCst));
        let shared = pending(self, ANY_UID);
        if shared == 0 {
            self.on_shared.clear();
        }
        let own = if uid == ANY_UID { 0 } else { pending(self, uid) };
        own + if uid == ANY_UID || self.on_shared.contains(&uid) { shared } else { 0 }
    }

    /// Fds still waiting to be closed, on all lanes and at the drainer.
    pub fn total_backlog(&self) -> usize {
        self.total.load(Ordering::SeqCst) + self.drainer.waiting()
    }

    fn lane(&mut self, uid: u32) -> Option<&Lane> {
        if let std::collections::hash_map::Entry::Vacant(slot) = self.lanes.entry(uid) {
            let (tx, rx) = mpsc::channel::<(Droppable, usize)>();
            let pending = Arc::new(AtomicUsize::new(0));
            let (mine, total) = (Arc::clone(&pending), Arc::clone(&self.total));
            std::thread::Builder::new()
                .name(format!("loopdev-close-{uid}"))
                .spawn(move || {
                    for (what, fds) in rx {
                        drop(what);
                        mine.fetch_sub(fds, Ordering::SeqCst);
                        total.fetch_sub(fds, Ordering::SeqCst);
                    }
                })
                .ok()?;
            slot.insert(Lane { tx, pending });
        }
        self.lanes.get(&uid)
    }
}

impl std::fmt::Debug for Closer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kept: usize = self.keepers.values().map(Keeper::held).sum();
        f.debug_struct("Closer")
            .field("lanes", &self.lanes.len())
            .field("backlog", &self.total_backlog())
            .field("kept", &kept)
            .finish()
    }
}

/// Stands for `fds` of a peer's fds whose close blocks until the sender of `until` is dropped.
#[cfg(test)]
pub(super) struct Wedged {
    pub fds: usize,
    pub until: mpsc::Receiver<()>,
}

#[cfg(test)]
impl Closable for Wedged {
    fn fds(&self) -> usize {
        self.fds
    }
}

#[cfg(test)]
impl Drop for Wedged {
    fn drop(&mut self) {
        let _ = self.until.recv();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Red team round 12: a uid without a lane of its own was judged by the shared lane's backlog, so a peer
    /// that wedged the shared lane stopped the server reading from root.
    #[test]
    fn the_shared_lane_backlog_counts_only_against_uids_whose_fds_are_on_it() {
        let mut closer = Closer::new(&[0]).unwrap();
        assert!(closer.lanes.contains_key(&0), "root's lane is started with the closer");
        // Fill every lane, so that the next uid's fds go to the shared lane, and wedge that.
        for uid in 1000..1000 + MAX_LANES as u32 {
            closer.close(uid, Vec::<OwnedFd>::new());
        }
        let (release, until) = mpsc::channel();
        closer.close(9999, Wedged { fds: 300, until });
        assert_eq!(closer.backlog(9999), 300, "the peer whose fds wait there is throttled");
        assert_eq!(closer.backlog(0), 0, "root is not");
        assert_eq!(closer.backlog(4242), 0, "nor a uid that never needed a lane");
        drop(release);
        let deadline = Instant::now() + Duration::from_secs(10);
        while closer.backlog(9999) > 0 {
            assert!(Instant::now() < deadline, "the shared lane did not drain");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(closer.on_shared.is_empty(), "forgotten once the shared lane is empty");
    }
}
