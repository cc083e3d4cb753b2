//! The threads that touch what peers send. Everything a peer's fds can block (fstat of a FUSE file whose
//! daemon stopped answering, a node made or removed in such a directory, the configure itself) runs here,
//! never on the server's poll thread, which only moves bytes and keeps time: a stuck request costs one
//! worker and gets ETIMEDOUT at its deadline, while the others are served.
//!
//! All workers are started with the server (any that cannot be are started on demand later): a peer that
//! takes every free pid must not leave the server with the one or two workers its own stuck requests hold,
//! and everyone else queued behind them (red team round 11, p2). Each opens loop-control per request (its
//! own flock). Every piece of work sent yields exactly one `Done` (unless the poll thread has gone, in which
//! case the worker drops what it made itself: a device nobody will be told about is released right there).

use super::attach::{Attacher, Counters, Held, Outgoing};
use super::options::ServerOptions;
use super::seqpacket::{self, PeerCred};
use crate::error::{Error, Result};
use nix::errno::Errno;
use std::os::unix::io::{AsFd, BorrowedFd, OwnedFd};
#[cfg(test)]
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

/// A request to attach a device: a well-formed message, owned entirely by the job.
#[derive(Debug)]
pub(super) struct Request {
    pub id: u64,
    pub peer: PeerCred,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
    /// Set by the poll thread when no one waits for the answer any more (deadline, hang-up, shutdown):
    /// a job not started yet is then skipped.
    pub cancelled: Arc<AtomicBool>,
}

#[derive(Debug)]
enum Work {
    Attach(Request),
    /// A uid's devices to release (remove the node, close the device): dropping them may block too.
    Release(u32, Vec<Held>),
}

#[derive(Debug)]
pub(super) enum Done {
    /// The reply for request `id`; None if the worker failed (panicked).
    Attached { id: u64, out: Option<Outgoing> },
    /// Request `id` was given up on before a worker took it: its fds come back unclosed, for the peer's
    /// lane to close. A close the peer made block then holds the peer's own lane, not a worker.
    Skipped { id: u64, uid: u32, fds: Vec<OwnedFd> },
    /// `uid`'s devices are released.
    Released { uid: u32 },
}

#[derive(Debug)]
pub(super) struct Workers {
    work: Option<mpsc::Sender<Work>>,
    queue: Arc<Mutex<mpsc::Receiver<Work>>>,
    done_tx: mpsc::Sender<Done>,
    done_rx: Option<mpsc::Receiver<Done>>,
    /// Signalled once per `Done`, so the poll thread wakes for it.
    wake: Arc<OwnedFd>,
    threads: usize,
    /// Work sent and not done yet.
    busy: usize,
    /// Of that, releases: shutdown waits for them all, including those of connections that hung up before.
    releasing: usize,
    max: usize,
    options: Arc<ServerOptions>,
    counters: Arc<Counters>,
}

impl Workers {
    pub fn new(max: usize, options: Arc<ServerOptions>, counters: Arc<Counters>) -> Result<Workers> {
        let (work, queue) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel();
        let mut workers = Workers {
            work: Some(work),
            queue: Arc::new(Mutex::new(queue)),
            done_tx,
            done_rx: Some(done_rx),
            wake: Arc::new(seqpacket::eventfd()?),
            threads: 0,
            busy: 0,
            releasing: 0,
            max: max.max(1),
            options,
            counters,
        };
        while workers.threads < workers.max && workers.spawn().is_ok() {}
        Ok(workers)
    }

    /// Readable when work is done.
    pub fn ready_fd(&self) -> BorrowedFd<'_> {
        self.wake.as_fd()
    }

    /// Err: no worker could be started (EAGAIN from clone); the request comes back (its fds are the
    /// caller's to close, off the poll thread).
    pub fn attach(&mut self, request: Request) -> std::result::Result<(), Box<(Error, Request)>> {
        self.send(Work::Attach(request)).map_err(|work| {
            let e = Error::os(Errno::EAGAIN, "clone").with_detail("the loop server could not start a worker thread");
            match work {
                Work::Attach(request) => Box::new((e, request)),
                Work::Release(..) => unreachable!("an attach was sent"),
            }
        })
    }

    /// Sends `uid`'s devices to a worker to be released; false if none could take them (none could be
    /// started at all): they are released here then, rather than leaked. That may block, but then there is
    /// no one else to serve anyway.
    pub fn release(&mut self, uid: u32, held: Vec<Held>) -> bool {
        if held.is_empty() {
            return false;
        }
        match self.send(Work::Release(uid, held)) {
            Ok(()) => {
                self.releasing += 1;
                true
            }
            Err(work) => {
                drop(work);
                false
            }
        }
    }

    /// Releases sent and not done yet.
    pub fn releasing(&self) -> usize {
        self.releasing
    }

    fn count(&mut self, done: &Done) {
        self.busy -= 1;
        if let Done::Released { .. } = done {
            self.releasing -= 1;
        }
    }

    /// Gives the work back when no thread can take it.
    fn send(&mut self, work: Work) -> std::result::Result<(), Work> {
        if self.busy >= self.threads && self.threads < self.max && self.spawn().is_err() && self.threads == 0 {
            return Err(work);
        }
        match &self.work {
            Some(sender) => sender.send(work).map_err(|e| e.0)?,
            None => return Err(work),
        }
        self.busy += 1;
        Ok(())
    }

    fn spawn(&mut self) -> Result<()> {
        let queue = Arc::clone(&self.queue);
        let done = self.done_tx.clone();
        let wake = Arc::clone(&self.wake);
        let attacher = Attacher::new(Arc::clone(&self.options), Arc::clone(&self.counters));
        std::thread::Builder::new()
            .name("loopdev-worker".into())
            .spawn(move || {
                own_umask();
                worker_loop(queue, done, wake, attacher)
            })
            .map_err(|e| Error::os(Errno::from_i32(e.raw_os_error().unwrap_or(libc::EAGAIN)), "clone"))?;
        self.threads += 1;
        Ok(())
    }

    /// What is done since the last call.
    pub fn take_done(&mut self) -> Vec<Done> {
        seqpacket::eventfd_take(self.wake.as_fd());
        let done: Vec<Done> = match &self.done_rx {
            Some(rx) => rx.try_iter().collect(),
            None => Vec::new(),
        };
        done.iter().for_each(|d| self.count(d));
        done
    }

    /// Waits up to `timeout` for one piece of work to finish (shutdown only: the poll loop uses `ready_fd`).
    pub fn wait_done(&mut self, timeout: std::time::Duration) -> Option<Done> {
        let done = self.done_rx.as_ref()?.recv_timeout(timeout).ok()?;
        self.count(&done);
        Some(done)
    }

    /// No more work: idle workers exit, busy ones when they finish; results they send from now on are dropped
    /// by the workers themselves (releasing their devices). Those sent already come back with the receiver,
    /// for the caller to drop where a close may block: one holds a peer's fds or a device (red team round 17,
    /// F1: dropped on the poll thread).
    pub fn close(&mut self) -> Option<mpsc::Receiver<Done>> {
        self.work = None;
        self.done_rx.take()
    }
}

/// A worker: requests and releases off the queue until the server is gone.
fn worker_loop(
    queue: Arc<Mutex<mpsc::Receiver<Work>>>,
    done: mpsc::Sender<Done>,
    wake: Arc<OwnedFd>,
    attacher: Attacher,
) {
    loop {
        let work = match queue.lock().unwrap_or_else(|e| e.into_inner()).recv() {
            Ok(w) => w,
            Err(_) => return, // the server is gone and the queue is empty
        };
        let result = match work {
            Work::Attach(r) if r.cancelled.load(Ordering::SeqCst) => {
                Done::Skipped { id: r.id, uid: r.peer.uid, fds: r.fds }
            }
            Work::Attach(r) => Done::Attached { id: r.id, out: serve(&attacher, r) },
            Work::Release(uid, held) => {
                let _ = catch_unwind(AssertUnwindSafe(move || drop(held)));
                Done::Released { uid }
            }
        };
        // Err: the poll thread is gone; `result` (and any device in it) is released here.
        if done.send(result).is_ok() {
            let _ = seqpacket::eventfd_signal(wake.as_fd());
        }
    }
}

/// Gives the calling worker a umask of its own, 0, so that every mode it passes is the mode it gets: the
/// directories it makes for non-root peers' nodes (`node::make_for_peer`) must be 0755 whatever the
/// embedding process's umask (a service's `UMask=0077` left peers unable to reach their node), and a chmod
/// afterwards could land on an empty directory of root's the peer slid in under the name (red team round
/// 24); root's nodes get exactly `node_mode`. CLONE_FS unshares only this thread's cwd, root and umask. If
/// it fails, the process's umask stays, and a stricter one makes non-root requests fail (the error says
/// which mode the directory got).
fn own_umask() {
    // SAFETY: unshare(CLONE_FS) changes only this thread's fs attributes.
    if unsafe { libc::unshare(libc::CLONE_FS) } == 0 {
        nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    }
}

impl super::closer::Closable for mpsc::Receiver<Done> {
    fn fds(&self) -> usize {
        0
    }
}

/// Closes the request's fds before it returns, so before its `Done`: a close the peer makes block (a pipe
/// whose lock its own splice holds) then keeps the request, and so this worker, counted against the peer's
/// uid, and one uid cannot wedge more workers than it may have requests (red team round 8, w1).
fn serve(attacher: &Attacher, r: Request) -> Option<Outgoing> {
    let Request { peer, payload, fds, .. } = r;
    catch_unwind(AssertUnwindSafe(|| attacher.handle(&payload, fds, &peer))).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn workers(max: usize) -> Workers {
        Workers::new(max, Arc::new(ServerOptions::default()), Arc::new(Counters::default())).unwrap()
    }

    /// Request `id` of uid 4242, given up on already, with the two ends of a pipe as its fds.
    fn given_up(id: u64) -> Request {
        let (r, wr) = nix::unistd::pipe().unwrap();
        // SAFETY: pipe() just returned these fds and nothing else owns them.
        let fds = unsafe { vec![OwnedFd::from_raw_fd(r), OwnedFd::from_raw_fd(wr)] };
        let peer = PeerCred { pid: 1, uid: 4242, gid: 4242 };
        Request { id, peer, payload: b"{}".to_vec(), fds, cancelled: Arc::new(AtomicBool::new(true)) }
    }

    #[test]
    fn every_worker_starts_with_the_server() {
        let mut w = workers(3);
        assert_eq!((w.threads, w.busy), (3, 0), "all three started before any work was sent");
        drop(w.close());
    }

    /// A request given up on before a worker took it is not closed by that worker: its fds come back in the
    /// `Done` for the peer's lane (a close the peer made block must not take a worker).
    #[test]
    fn a_request_given_up_on_comes_back_with_its_fds_open() {
        let mut w = workers(1);
        w.attach(given_up(7)).unwrap();
        match w.wait_done(Duration::from_secs(10)) {
            Some(Done::Skipped { id: 7, uid: 4242, fds }) => {
                assert_eq!(fds.len(), 2);
                assert_eq!(nix::unistd::write(fds[1].as_raw_fd(), b"x"), Ok(1), "the write end is still open");
            }
            other => panic!("expected Skipped: {other:?}"),
        }
        drop(w.close());
    }

    /// Red team round 17, F1: results sent but not taken when the server closes come back with the receiver,
    /// unclosed, rather than being dropped (their fds closed) by `close` on the poll thread.
    #[test]
    fn results_not_taken_at_close_come_back_unclosed() {
        let mut w = workers(1);
        w.attach(given_up(8)).unwrap();
        let rest = w.close().expect("the receiver");
        match rest.recv_timeout(Duration::from_secs(10)) {
            Ok(Done::Skipped { id: 8, fds, .. }) => {
                assert_eq!(nix::unistd::write(fds[1].as_raw_fd(), b"x"), Ok(1), "the write end is still open");
            }
            other => panic!("expected Skipped: {other:?}"),
        }
    }
}
