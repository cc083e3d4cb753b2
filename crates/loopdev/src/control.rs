//! `LoopControl`: `/dev/loop-control` and the race-safe allocation of a free device.

use crate::device::{ConfigureOptions, Loop};
use crate::error::{Error, Result};
use crate::inode::{dir_path, open_in};
use crate::ioctl;
use nix::errno::Errno;
use nix::fcntl::OFlag;
use std::os::unix::io::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// How often loop_for_fd looks for another device after losing a race (systemd uses the same bound).
pub const MAX_ATTEMPTS: u32 = 64;

#[derive(Debug)]
pub struct LoopControl {
    fd: OwnedFd,
    /// Where the loop nodes live (None = /dev); our own dup so the caller may close theirs.
    dir: Option<OwnedFd>,
    path: PathBuf,
    /// flock belongs to the open file description, which every thread using this LoopControl shares: a
    /// second caller's LOCK_EX succeeds at once and the first LOCK_UN frees the lock for all of them. So
    /// callers in this process queue here first.
    serial: Mutex<()>,
}

impl LoopControl {
    /// Opens `<dir>/loop-control` (default `/dev`).
    pub fn open(dir: Option<BorrowedFd>) -> Result<LoopControl> {
        let fd = open_in(dir, "loop-control", OFlag::O_RDWR)?;
        let own_dir = dir
            .map(|d| {
                d.try_clone_to_owned().map_err(|e| Error::os(Errno::from_i32(e.raw_os_error().unwrap_or(0)), "dup"))
            })
            .transpose()?;
        Ok(LoopControl { fd, dir: own_dir, path: dir_path(dir).join("loop-control"), serial: Mutex::new(()) })
    }

    fn dir(&self) -> Option<BorrowedFd<'_>> {
        self.dir.as_ref().map(|d| d.as_fd())
    }

    fn err(&self, name: &'static str) -> impl Fn(Errno) -> Error + '_ {
        move |e| Error::ioctl(e, name).with_path(&self.path)
    }

    /// LOOP_CTL_ADD; `None` = the first free minor. Returns the minor created.
    pub fn add(&self, minor: Option<u32>) -> Result<u32> {
        ioctl::ctl_add(self.fd.as_fd(), minor_arg(minor)?).map_err(self.err("LOOP_CTL_ADD"))
    }

    /// LOOP_CTL_REMOVE.
    pub fn remove(&self, minor: Option<u32>) -> Result<()> {
        ioctl::ctl_remove(self.fd.as_fd(), minor_arg(minor)?).map_err(self.err("LOOP_CTL_REMOVE"))
    }

    /// LOOP_CTL_GET_FREE.
    pub fn get_unbound(&self) -> Result<u32> {
        ioctl::ctl_get_free(self.fd.as_fd()).map_err(self.err("LOOP_CTL_GET_FREE"))
    }

    /// Opens `loop<minor>` next to loop-control.
    pub fn open_loop(&self, minor: u32) -> Result<Loop> {
        Loop::open(minor, self.dir())
    }

    /// Binds `backing` to a free loop device and returns it open.
    ///
    /// get-free → open → (still unbound?) → `setup` → (lock: LOCK_EX) → configure. Another process can take
    /// the free device between get-free and configure; then the kernel answers EBUSY (or the device is
    /// already bound when opened, or the node vanished) and we try a fresh device after a short jittered
    /// pause, at most MAX_ATTEMPTS times. Cooperating processes are serialised by an exclusive flock on
    /// loop-control up to the configure (not across it: it can take long); a minor this process is configuring
    /// is not taken again by its other threads, which add a new device instead.
    ///
    /// Locks are taken in systemd's order (loop-util.c): loop-control first, then LOCK_EX on the device,
    /// never the other way round; a process doing the same for the same free minor would otherwise deadlock
    /// with us. The device lock is not waited for while loop-control is held: a device someone else keeps
    /// locked (beyond a few ms, e.g. a udev probe) is skipped, and since GET_FREE would hand it out again, the
    /// next attempt creates a new device (LOOP_CTL_ADD) instead. The loop-control lock is not held while `setup` runs (the callback may wait on
    /// other work, in JS the event loop, that itself wants the lock); it is taken again before the device
    /// lock, and the device is checked again under it so we never wait for the lock of a device someone
    /// bound meanwhile. A device this call did not bind is never cleared.
    pub fn loop_for_fd<E, F>(
        &self,
        backing: BorrowedFd,
        opts: &ConfigureOptions,
        lock: bool,
        mut setup: Option<F>,
    ) -> std::result::Result<Loop, E>
    where
        E: From<Error>,
        F: FnMut(&Loop) -> std::result::Result<(), E>,
    {
        let mut last = Error::ioctl(Errno::EBUSY, "LOOP_CONFIGURE");
        let mut locked_by_others: Vec<u32> = Vec::new();
        for attempt in 0..MAX_ATTEMPTS {
            if attempt > 0 {
                std::thread::sleep(backoff(attempt));
            }
            let mut serial = self.serialise()?;
            let mut minor = self.get_unbound()?;
            if locked_by_others.contains(&minor) {
                minor = self.add(None)?;
            } else if Configuring::has(minor) {
                minor = match Configuring::spare(&locked_by_others) {
                    Some(spare) => spare,
                    None => Configuring::keep_spare(self.add(None)?),
                };
            }
            let lo = match self.open_loop(minor) {
                Ok(lo) => lo,
                // Removed by someone between get-free and open.
                Err(e) if e.is(Errno::ENOENT) || e.is(Errno::ENXIO) => {
                    last = e;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if let Some(setup) = setup.as_mut() {
                // Someone else bound it between get-free and open: do not even show it to setup. (Without a
                // setup, configure's EBUSY says the same for one ioctl less.)
                if let Some(taken) = bound_by_someone(&lo)? {
                    last = taken;
                    continue;
                }
                drop(serial);
                setup(&lo)?;
                serial = self.serialise()?;
                if let Some(taken) = bound_by_someone(&lo)? {
                    last = taken;
                    continue;
                }
            }
            if lock && !lock_briefly(&lo)? {
                locked_by_others.push(minor);
                last = Error::os(Errno::EWOULDBLOCK, "flock").with_path(lo.path());
                continue;
            }
            // Loop-control's lock is not held across the configure: the kernel may fsync the backing file
            // there (switching to direct I/O), for as long as the caller's dirty pages make it, and every
            // other bind of ours would wait (red team round 26: a peer's scattered writes kept the server's
            // other workers, root's too, waiting 7-26 s). The minor is marked ours instead: GET_FREE hands it
            // out until it is bound, and opening it would wait in the kernel for that same fsync.
            let _configuring = Configuring::mark(minor);
            drop(serial);
            match lo.configure(backing, opts) {
                Ok(()) => return Ok(lo),
                Err(e) if e.is(Errno::EBUSY) => last = e,
                Err(e) => return Err(e.into()),
            }
        }
        Err(last.with_detail(format!("no free loop device after {MAX_ATTEMPTS} attempts")).into())
    }

    /// Exclusive use of loop-control, by this process's other threads and by other processes, until the
    /// guard drops.
    fn serialise(&self) -> Result<Serialised<'_>> {
        // A panic in another holder cannot leave loop-control half-done: the flock is released by its guard.
        let guard = self.serial.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        ioctl::flock(self.fd.as_fd(), libc::LOCK_EX).map_err(|e| Error::os(e, "flock").with_path(&self.path))?;
        Ok(Serialised { fd: self.fd.as_fd(), _thread: guard })
    }
}

/// Minors this process is configuring, with loop-control's lock let go (see `loop_for_fd`).
static CONFIGURING: Mutex<Vec<u32>> = Mutex::new(Vec::new());
/// Minors this process added because GET_FREE handed out one it was configuring; used again once free, so
/// that a long configure does not make every other bind meanwhile add a device of its own (a re-attack of
/// round 26's fix added 214 in 13 s).
static SPARES: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// A minor marked as being configured by this process until dropped.
struct Configuring(u32);

impl Configuring {
    fn mark(minor: u32) -> Configuring {
        CONFIGURING.lock().unwrap_or_else(|p| p.into_inner()).push(minor);
        Configuring(minor)
    }

    fn has(minor: u32) -> bool {
        CONFIGURING.lock().unwrap_or_else(|p| p.into_inner()).contains(&minor)
    }

    /// A spare that is neither being configured by us nor bound (sysfs shows no backing file), nor in
    /// `skip`. Someone may still bind it first: configure's EBUSY then makes the caller try again.
    fn spare(skip: &[u32]) -> Option<u32> {
        let spares = SPARES.lock().unwrap_or_else(|p| p.into_inner()).clone();
        spares.into_iter().find(|&m| {
            !skip.contains(&m)
                && !Configuring::has(m)
                && std::path::Path::new(&format!("/sys/block/loop{m}")).exists()
                && !std::path::Path::new(&format!("/sys/block/loop{m}/loop/backing_file")).exists()
        })
    }

    fn keep_spare(minor: u32) -> u32 {
        SPARES.lock().unwrap_or_else(|p| p.into_inner()).push(minor);
        minor
    }
}

impl Drop for Configuring {
    fn drop(&mut self) {
        let mut marked = CONFIGURING.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = marked.iter().position(|&m| m == self.0) {
            marked.swap_remove(i);
        }
    }
}

/// LOCK_EX on `lo`, waiting a few ms at most (without blocking, so loop-control's lock is never held while
/// waiting on a device: see `loop_for_fd`). False when someone else keeps it locked.
fn lock_briefly(lo: &Loop) -> Result<bool> {
    for pause_ms in [0, 1, 2, 4] {
        std::thread::sleep(Duration::from_millis(pause_ms));
        match lo.flock(libc::LOCK_EX | libc::LOCK_NB) {
            Ok(()) => return Ok(true),
            Err(e) if e.is(Errno::EWOULDBLOCK) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

/// The EBUSY to report when `lo` turns out bound already, or None when it is free.
fn bound_by_someone(lo: &Loop) -> Result<Option<Error>> {
    match lo.get_status() {
        Ok(_) => Ok(Some(Error::ioctl(Errno::EBUSY, "LOOP_CONFIGURE").with_path(lo.path()))),
        Err(e) if e.is(Errno::ENXIO) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Unlocks the flock before the mutex (fields drop after `drop`), so no thread of ours can take the mutex
/// while the flock is still held on its behalf.
struct Serialised<'a> {
    fd: BorrowedFd<'a>,
    _thread: MutexGuard<'a, ()>,
}

impl Drop for Serialised<'_> {
    fn drop(&mut self) {
        let _ = ioctl::flock(self.fd, libc::LOCK_UN);
    }
}

fn minor_arg(minor: Option<u32>) -> Result<i32> {
    match minor {
        None => Ok(-1),
        Some(m) => i32::try_from(m)
            .map_err(|_| Error::os(Errno::EINVAL, "ioctl").with_detail(format!("minor {m} out of range"))),
    }
}

/// 0..=attempt ms (capped at 20), so racing processes stop colliding without slowing the common case.
fn backoff(attempt: u32) -> Duration {
    let mut r = 0u32;
    // SAFETY: getrandom writes at most the 4 bytes we pass; a short read leaves r at 0, which is fine.
    unsafe { libc::getrandom(&mut r as *mut u32 as *mut libc::c_void, 4, libc::GRND_NONBLOCK) };
    let cap = attempt.min(20) + 1;
    Duration::from_micros(u64::from(r % (cap * 1000)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_within_its_cap() {
        for attempt in 1..100 {
            assert!(backoff(attempt) <= Duration::from_millis(21));
        }
    }

    /// Whether a separate open of loop-control (another process, as far as flock can tell) finds it locked.
    fn locked_for_others() -> bool {
        let other = LoopControl::open(None).unwrap();
        match ioctl::flock(other.fd.as_fd(), libc::LOCK_EX | libc::LOCK_NB) {
            Ok(()) => false,
            Err(e) => {
                assert_eq!(e, Errno::EWOULDBLOCK);
                true
            }
        }
    }

    #[test]
    fn threads_sharing_one_loop_control_take_its_lock_in_turn() {
        let ctl = LoopControl::open(None).unwrap();
        let first = ctl.serialise().unwrap();
        let (entered_tx, entered) = std::sync::mpsc::channel();
        let (leave_tx, leave) = std::sync::mpsc::channel::<()>();
        let shared = &ctl;
        // `move`: a failed assertion drops leave_tx, which lets the thread (and the scope) finish.
        std::thread::scope(move |s| {
            s.spawn(move || {
                let _second = shared.serialise().unwrap();
                entered_tx.send(()).unwrap();
                let _ = leave.recv();
            });
            // Same open file description: flock alone would let the second thread straight in.
            assert!(entered.recv_timeout(Duration::from_millis(200)).is_err(), "second caller got in");
            drop(first);
            entered.recv_timeout(Duration::from_secs(5)).unwrap();
            // The first unlock must not have released the lock the second caller now relies on.
            assert!(locked_for_others(), "loop-control unlocked while a caller is inside");
            leave_tx.send(()).unwrap();
        });
    }

    #[test]
    fn minor_arg_maps_none_to_minus_one() {
        assert_eq!(minor_arg(None).unwrap(), -1);
        assert_eq!(minor_arg(Some(7)).unwrap(), 7);
        assert_eq!(minor_arg(Some(u32::MAX)).unwrap_err().code(), "EINVAL");
    }
}
