//! Our fd table, the one resource every peer draws on: the connections, the fds peers sent that wait to be
//! closed, the devices held for them (each with its directory and its mount), the requests at the workers.
//! The bounds on each kind (per uid, per lane) do not add up to the table: a uid holding its 64 devices
//! (3 fds each then; 4 now) and a wedged lane one read of 253 fds past its bound filled a table of 512,
//! and root's next request lost its fds to MSG_CTRUNC (red team round 18). So reading, accepting and attaching also
//! ask what is left of the table, and keep a reserve for root.
//!
//! The count is kept, not read from /proc at every turn: what the process had open when the server started,
//! plus what the server holds for peers. Fds the embedding process opens later are not counted; the
//! reserve's slack is all that covers them.

use super::seqpacket::SCM_MAX_FD;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Fds one read can add: as many as one SCM_RIGHTS message carries. A read cannot take fewer: what does not
/// fit is closed by the kernel on the reading thread, and a peer can make that close block.
pub(super) const ONE_READ: usize = SCM_MAX_FD;
/// Fds a request at a worker may hold at once: its 2 fds and a payload memfd, loop-control, the device, the
/// placeholder, the mount, and the fd sent with the reply (root) or root's directory for the node and a
/// moment's look into it (others).
pub(super) const PER_REQUEST: usize = 9;
/// Fds a request waiting for a worker holds: its 2 fds and a payload memfd.
pub(super) const PER_QUEUED: usize = 3;
/// Fds a device held for a peer keeps open: the device, the peer's directory, the mount, and root's
/// directory the node is in (not for root's devices, which are counted as if they had one).
pub(super) const PER_DEVICE: usize = 4;
/// Fds a connection may hold: its socket and an fd in a reply not sent yet.
pub(super) const PER_CONNECTION: usize = 2;
/// Fds root's message takes (its 2, and room for a few more than a request carries).
const ROOT_READ: usize = 16;
/// Slack for what else opens fds for a moment: a release reading sysfs, the embedding process.
const SLACK: usize = 16;

#[derive(Debug)]
pub(super) struct FdBudget {
    limit: usize,
    /// Open when the server started: ours, and the embedding process's.
    base: usize,
    /// Kept for root's requests while peers are not read: every worker serving root at once.
    reserve: usize,
    /// Fds left, as the poll thread last counted them (read by the workers when they reserve a device).
    room: AtomicUsize,
}

impl Default for FdBudget {
    /// No limit (for parts used without a server).
    fn default() -> Self {
        FdBudget { limit: usize::MAX, base: 0, reserve: 0, room: AtomicUsize::new(usize::MAX) }
    }
}

impl FdBudget {
    /// The table as it is now (`limit`: RLIMIT_NOFILE), for a server with `workers` workers.
    pub fn new(limit: usize, workers: usize) -> FdBudget {
        let base = std::fs::read_dir("/proc/self/fd").map_or(64, |d| d.count());
        let reserve = workers * PER_REQUEST + SLACK;
        FdBudget { limit, base, reserve, room: AtomicUsize::new(limit.saturating_sub(base)) }
    }

    /// Records what the server holds for peers now, in fds; returns what is left.
    pub fn count(&self, held: usize) -> usize {
        let room = self.limit.saturating_sub(self.base.saturating_add(held));
        self.room.store(room, Ordering::SeqCst);
        room
    }

    /// Whether `uid`'s next message may be read with `room` fds left: root's while there is room for it,
    /// anyone else's only if root's reserve is left after the largest message.
    pub fn may_read(&self, uid: u32, room: usize) -> bool {
        room >= if uid == 0 { ROOT_READ } else { ONE_READ + self.reserve }
    }

    /// Whether a connection may be accepted with `room` left: a turn of the poll loop accepts `batch` at
    /// most, and root's reserve must be left after them.
    pub fn may_accept(&self, room: usize, batch: usize) -> bool {
        room >= batch + self.reserve
    }

    /// Whether a device may be held for `uid` now (asked by a worker, with the room last counted).
    pub fn may_hold_device(&self, uid: u32) -> bool {
        let room = self.room.load(Ordering::SeqCst);
        room >= PER_DEVICE + if uid == 0 { 0 } else { self.reserve }
    }

    /// Fds left, as last counted.
    pub fn room(&self) -> usize {
        self.room.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_keeps_a_reserve_that_others_cannot_read_or_attach_into() {
        let budget = FdBudget { limit: 512, base: 30, reserve: 80, room: AtomicUsize::new(0) };
        // A uid's 64 devices and its connections: 256 + 66 fds.
        let room = budget.count(64 * PER_DEVICE + 33 * PER_CONNECTION);
        assert_eq!(room, 512 - 30 - 256 - 66);
        assert!(!budget.may_read(65534, room), "one more read could take root's reserve");
        assert!(budget.may_read(0, room));
        assert!(budget.may_hold_device(65534), "above the reserve: a device still fits");
        let room = budget.count(512 - 30 - 80);
        assert!(!budget.may_hold_device(65534) && budget.may_hold_device(0));
        assert!(!budget.may_accept(room, 64));
        assert_eq!(budget.count(usize::MAX), 0, "more than the table: nothing left, no overflow");
    }
}
