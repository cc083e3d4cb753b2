//! Closing what peers sent, off the poll thread. The last close of a peer's socket can block for as long as
//! the peer likes (SO_LINGER with unsent data to a receiver that never reads), and closing a connection
//! also closes every fd still queued on it. So the poll thread never drops a peer's fd or a connection
//! itself: it hands them here. Each uid has a lane (a thread) of its own, so a peer can only hold up its
//! own closes; uids beyond `MAX_LANES` share one.

use std::collections::HashMap;
use std::sync::mpsc;

const MAX_LANES: usize = 64;
/// The shared lane, for uids beyond `MAX_LANES` and for sockets whose peer is unknown.
pub(super) const ANY_UID: u32 = u32::MAX;

type Droppable = Box<dyn Send>;

#[derive(Default)]
pub(super) struct Closer {
    lanes: HashMap<u32, mpsc::Sender<Droppable>>,
}

impl Closer {
    /// Drops `what` on `uid`'s lane. Should no thread start (the system is out of them), it is dropped
    /// here: there is no better place left.
    pub fn close(&mut self, uid: u32, what: impl Send + 'static) {
        let uid = if self.lanes.contains_key(&uid) || self.lanes.len() < MAX_LANES { uid } else { ANY_UID };
        let what: Droppable = Box::new(what);
        let what = match self.lane(uid) {
            Some(lane) => match lane.send(what) {
                Ok(()) => return,
                Err(mpsc::SendError(what)) => what,
            },
            None => what,
        };
        self.lanes.remove(&uid);
        drop(what);
    }

    fn lane(&mut self, uid: u32) -> Option<&mpsc::Sender<Droppable>> {
        if let std::collections::hash_map::Entry::Vacant(slot) = self.lanes.entry(uid) {
            let (tx, rx) = mpsc::channel::<Droppable>();
            std::thread::Builder::new()
                .name(format!("loopdev-close-{uid}"))
                .spawn(move || rx.into_iter().for_each(drop))
                .ok()?;
            slot.insert(tx);
        }
        self.lanes.get(&uid)
    }
}

impl std::fmt::Debug for Closer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Closer").field("lanes", &self.lanes.len()).finish()
    }
}
