//! `LoopControl`: `/dev/loop-control` and the race-safe allocation of a free device.

use crate::device::{dir_path, open_in, ConfigureOptions, Loop};
use crate::error::{Error, Result};
use crate::ioctl;
use nix::errno::Errno;
use nix::fcntl::OFlag;
use std::os::unix::io::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

/// How often loop_for_fd looks for another device after losing a race (systemd uses the same bound).
pub const MAX_ATTEMPTS: u32 = 64;

#[derive(Debug)]
pub struct LoopControl {
    fd: OwnedFd,
    /// Where the loop nodes live (None = /dev); our own dup so the caller may close theirs.
    dir: Option<OwnedFd>,
    path: PathBuf,
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
        Ok(LoopControl { fd, dir: own_dir, path: dir_path(dir).join("loop-control") })
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
    /// get-free → open → (still unbound?) → `setup` → (lock: LOCK_EX|LOCK_NB) → configure. Another process can
    /// take the free device between get-free and configure; then the kernel answers EBUSY (or the device is
    /// already bound when opened, or the node vanished, or someone holds its lock) and we try a fresh device after a short jittered pause, at most MAX_ATTEMPTS times.
    /// Cooperating processes are serialised by an exclusive flock on loop-control from get-free to
    /// configure, so they do not even collide. The flock is not held while `setup` runs: the callback may
    /// wait on other work (in JS, the event loop) that itself wants the flock. A device this call did not
    /// bind is never cleared.
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
        for attempt in 0..MAX_ATTEMPTS {
            if attempt > 0 {
                std::thread::sleep(backoff(attempt));
            }
            let mut serial = Some(self.serialise()?);
            let minor = self.get_unbound()?;
            let lo = match self.open_loop(minor) {
                Ok(lo) => lo,
                // Removed by someone between get-free and open.
                Err(e) if e.is(Errno::ENOENT) || e.is(Errno::ENXIO) => {
                    last = e;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            // Someone else bound it between get-free and open: do not even show it to setup.
            match lo.get_status() {
                Ok(_) => {
                    last = Error::ioctl(Errno::EBUSY, "LOOP_CONFIGURE").with_path(lo.path());
                    continue;
                }
                Err(e) if e.is(Errno::ENXIO) => {}
                Err(e) => return Err(e.into()),
            }
            if let Some(setup) = setup.as_mut() {
                serial = None;
                setup(&lo)?;
            }
            if lock {
                match lo.flock(libc::LOCK_EX | libc::LOCK_NB) {
                    Err(e) if e.is(Errno::EWOULDBLOCK) => {
                        last = e;
                        continue;
                    }
                    other => other?,
                }
            }
            let _serial = match serial {
                Some(held) => held,
                None => self.serialise()?,
            };
            match lo.configure(backing, opts) {
                Ok(()) => return Ok(lo),
                Err(e) if e.is(Errno::EBUSY) => last = e,
                Err(e) => return Err(e.into()),
            }
        }
        Err(last.with_detail(format!("no free loop device after {MAX_ATTEMPTS} attempts")).into())
    }

    /// Exclusive flock on loop-control until the guard drops.
    fn serialise(&self) -> Result<Serialised<'_>> {
        ioctl::flock(self.fd.as_fd(), libc::LOCK_EX).map_err(|e| Error::os(e, "flock").with_path(&self.path))?;
        Ok(Serialised(self.fd.as_fd()))
    }
}

struct Serialised<'a>(BorrowedFd<'a>);

impl Drop for Serialised<'_> {
    fn drop(&mut self) {
        let _ = ioctl::flock(self.0, libc::LOCK_UN);
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

    #[test]
    fn minor_arg_maps_none_to_minus_one() {
        assert_eq!(minor_arg(None).unwrap(), -1);
        assert_eq!(minor_arg(Some(7)).unwrap(), 7);
        assert_eq!(minor_arg(Some(u32::MAX)).unwrap_err().code(), "EINVAL");
    }
}
