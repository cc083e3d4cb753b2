//! Closing what peers sent, off the poll thread. The last close of a peer's socket can block for as long as
//! the peer likes (SO_LINGER with unsent data to a receiver that never reads; a FUSE file's flush), and
//! closing a connection also closes every fd still queued on it. So the poll thread never drops a peer's fd
//! or a connection itself: it hands them here. Each uid has a lane (a thread) of its own, so a peer can only
//! hold up its own closes; uids beyond `MAX_LANES` share one.
//!
//! A wedged lane keeps what is queued on it open, in our fd table: the server asks `backlog` and stops
//! reading from a uid whose lane holds too much, and stops accepting while all lanes together do.
//!
//! A peer's socket is different: the peer can make as many as it likes (connect, hang up, connect), so
//! they must not pile up in our fd table. `close_socket` closes one at once if nothing is queued on it (see
//! `seqpacket::disarm`). One that still holds fds is parked: sent, up to `SCM_MAX_FD` at a time, in
//! `SCM_RIGHTS` over a socket pair of its lane. The sockets wait in the kernel, in no fd table (the pair
//! costs two fds per lane while anything waits in it); the lane receives each batch with room for no fds,
//! which makes the kernel close them on the lane's thread. How many a peer can have parked is bounded by
//! the kernel too (each holds at least one of the peer's fds in flight, and a user's fds in flight are
//! limited to its `RLIMIT_NOFILE`) and by `MAX_PARKED` per lane.

use super::seqpacket::{self, Leftover, SCM_MAX_FD};
use std::collections::HashMap;
use crate::error::Result;
use std::os::unix::io::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};

const MAX_LANES: usize = 64;
/// Sockets one lane keeps parked at most; more are closed on it as ordinary fds (counted, see above).
const MAX_PARKED: usize = 1 << 16;
/// The shared lane, for uids beyond `MAX_LANES` and for sockets whose peer is unknown.
pub(super) const ANY_UID: u32 = u32::MAX;

type Droppable = Box<dyn Send>;

enum Job {
    Close(Droppable),
    /// One batch of parked sockets is waiting in the pair this is the receiving end of.
    Unpark(Arc<OwnedFd>, usize),
}

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
    /// Jobs, with the fds of ours each holds.
    tx: mpsc::Sender<(Job, usize)>,
    /// Fds queued on this lane and not closed yet.
    pending: Arc<AtomicUsize>,
    /// Sockets to park with the next batch (in our fd table until `park_all`).
    to_park: Vec<OwnedFd>,
    /// The pair batches are parked in: (sending end, receiving end). Kept while batches sent through it
    /// wait (so a wedged lane costs two fds, not one per batch); dropped once the lane has taken them all.
    parking: Option<(OwnedFd, Arc<OwnedFd>)>,
    /// Sockets parked and not closed yet.
    parked: Arc<AtomicUsize>,
}

pub(super) struct Closer {
    lanes: HashMap<u32, Lane>,
    /// Fds queued on all lanes and not closed yet.
    total: Arc<AtomicUsize>,
    /// Signalled by a lane that took the last batch parked in its pair, so that the poll thread (which
    /// polls `ready_fd`) closes the pair.
    tidy: Arc<OwnedFd>,
}

impl Closer {
    pub fn new() -> Result<Closer> {
        Ok(Closer { lanes: HashMap::new(), total: Arc::default(), tidy: Arc::new(seqpacket::eventfd()?) })
    }

    pub fn ready_fd(&self) -> BorrowedFd<'_> {
        self.tidy.as_fd()
    }

    /// Drops `what` on `uid`'s lane. Should no thread start (the system is out of them), it is dropped here:
    /// there is no better place left.
    pub fn close(&mut self, uid: u32, what: impl Closable) {
        let fds = what.fds();
        self.enqueue(uid, Job::Close(Box::new(what)), fds);
    }

    fn enqueue(&mut self, uid: u32, job: Job, fds: usize) {
        let uid = self.lane_uid(uid);
        let total = Arc::clone(&self.total);
        let job = match self.lane(uid) {
            Some(lane) => {
                lane.pending.fetch_add(fds, Ordering::SeqCst);
                total.fetch_add(fds, Ordering::SeqCst);
                match lane.tx.send((job, fds)) {
                    Ok(()) => return,
                    Err(mpsc::SendError((job, _))) => {
                        lane.pending.fetch_sub(fds, Ordering::SeqCst);
                        total.fetch_sub(fds, Ordering::SeqCst);
                        job
                    }
                }
            }
            None => job,
        };
        self.lanes.remove(&uid);
        drop(job);
    }

    /// Closes a peer's socket: here if that cannot block, else on `uid`'s lane, parked (see above) until it
    /// gets there. Call `park_all` before waiting: sockets are parked in batches.
    pub fn close_socket(&mut self, uid: u32, sock: OwnedFd) {
        if seqpacket::disarm(sock.as_fd()) == Leftover::Nothing {
            return drop(sock);
        }
        let uid = self.lane_uid(uid);
        match self.lane(uid) {
            Some(lane) if lane.parked.load(Ordering::SeqCst) + lane.to_park.len() < MAX_PARKED => {
                lane.to_park.push(sock);
                if lane.to_park.len() == SCM_MAX_FD {
                    self.park(uid);
                }
            }
            Some(_) => self.close(uid, sock),
            None => drop(sock),
        }
    }

    /// Parks every socket `close_socket` has batched, and closes the pairs whose batches were all taken.
    pub fn park_all(&mut self) {
        let uids: Vec<u32> = self.lanes.iter().filter(|(_, l)| !l.to_park.is_empty()).map(|(&uid, _)| uid).collect();
        for uid in uids {
            self.park(uid);
        }
        for lane in self.lanes.values_mut() {
            if lane.parking.as_ref().map_or(false, |(_, r)| Arc::strong_count(r) == 1) {
                lane.parking = None;
            }
        }
    }

    fn park(&mut self, uid: u32) {
        let lane = match self.lanes.get_mut(&uid) {
            Some(lane) => lane,
            None => return,
        };
        let batch = std::mem::take(&mut lane.to_park);
        let fds: Vec<_> = batch.iter().map(|s| s.as_fd()).collect();
        // Into the current pair; when it is full (EAGAIN: some hundreds of batches wait), into a fresh one.
        for fresh in [false, true] {
            if fresh || lane.parking.is_none() {
                lane.parking = seqpacket::socketpair_nonblocking().ok().map(|(w, r)| (w, Arc::new(r)));
            }
            if let Some((w, r)) = &lane.parking {
                if seqpacket::send(w.as_fd(), &[0], &fds).is_ok() {
                    lane.parked.fetch_add(fds.len(), Ordering::SeqCst);
                    let job = Job::Unpark(Arc::clone(r), fds.len());
                    // Ours are no longer the last references to the parked sockets: dropping them closes nothing.
                    drop(fds);
                    drop(batch);
                    return self.enqueue(uid, job, 0);
                }
            }
        }
        // No pair: close them as any other fds of this uid.
        drop(fds);
        self.close(uid, batch);
    }

    /// Fds still waiting to be closed for `uid` (its lane's backlog).
    pub fn backlog(&self, uid: u32) -> usize {
        let uid = if self.lanes.contains_key(&uid) { uid } else { ANY_UID };
        self.lanes.get(&uid).map_or(0, |l| l.pending.load(Ordering::SeqCst))
    }

    /// Fds still waiting to be closed on all lanes.
    pub fn total_backlog(&self) -> usize {
        self.total.load(Ordering::SeqCst)
    }

    fn lane_uid(&self, uid: u32) -> u32 {
        if self.lanes.contains_key(&uid) || self.lanes.len() < MAX_LANES {
            uid
        } else {
            ANY_UID
        }
    }

    fn lane(&mut self, uid: u32) -> Option<&mut Lane> {
        if let std::collections::hash_map::Entry::Vacant(slot) = self.lanes.entry(uid) {
            let (tx, rx) = mpsc::channel::<(Job, usize)>();
            let pending = Arc::new(AtomicUsize::new(0));
            let (mine, total) = (Arc::clone(&pending), Arc::clone(&self.total));
            let tidy = Arc::clone(&self.tidy);
            let parked = Arc::new(AtomicUsize::new(0));
            let unparked = Arc::clone(&parked);
            std::thread::Builder::new()
                .name(format!("loopdev-close-{uid}"))
                .spawn(move || {
                    for (job, fds) in rx {
                        match job {
                            Job::Close(what) => drop(what),
                            // Room for no fds: the kernel closes the batch here, on this thread.
                            Job::Unpark(r, sockets) => {
                                let _ = seqpacket::recv(r.as_fd(), &mut [0u8; 1], 0);
                                unparked.fetch_sub(sockets, Ordering::SeqCst);
                                // Only the poll thread's reference is left after ours: it may close the pair.
                                if Arc::strong_count(&r) == 2 {
                                    let _ = seqpacket::eventfd_signal(tidy.as_fd());
                                }
                            }
                        }
                        mine.fetch_sub(fds, Ordering::SeqCst);
                        total.fetch_sub(fds, Ordering::SeqCst);
                    }
                })
                .ok()?;
            slot.insert(Lane { tx, pending, to_park: Vec::new(), parking: None, parked });
        }
        self.lanes.get_mut(&uid)
    }
}

impl Drop for Closer {
    fn drop(&mut self) {
        self.park_all();
    }
}

impl std::fmt::Debug for Closer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Closer").field("lanes", &self.lanes.len()).field("backlog", &self.total_backlog()).finish()
    }
}
