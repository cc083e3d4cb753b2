//! Whether a peer that is not root may hold an open fd of the device it asked for (`want_fd`).
//!
//! The kernel checks nothing but the fd for most loop ioctls. Its holder can `LOOP_CLR_FD`; swap the file of
//! a *read-only* binding with `LOOP_CHANGE_FD`, which checks only the new fd (one the peer may only write
//! would then be read through the device); rebind the device with `LOOP_SET_FD` or `LOOP_CONFIGURE` once it is
//! unbound; and, holding it writable, `LOOP_SET_STATUS64`. So a non-root peer gets an fd only when
//! - the binding is writable: its own fd of the file was O_RDWR, so the device gives nothing the peer did
//!   not have, and `LOOP_CHANGE_FD` refuses a writable device;
//! - the kernel keeps a device bound until its last close, even after `LOOP_CLR_FD` (Linux 6.11 and later):
//!   then the fd can never see the device unbound, so it can neither rebind it nor reach whatever file is
//!   bound to that minor next. Older kernels clear at once when the caller is the only opener. This is
//!   probed once, on a device of our own, rather than read from the version.
//!
//! A device whose peer still holds its fd when the connection closes stays bound, counted against the
//! peer's quota, until it is closed (see `Counters::sweep_lingering`).

use super::wire::WireError;
use crate::control::LoopControl;
use crate::device::ConfigureOptions;
use crate::error::Result;
use nix::errno::Errno;
use std::os::unix::io::{AsFd, AsRawFd};
use std::sync::Mutex;

/// The probe's answer, once asked.
static DEFERRED_CLEAR: Mutex<Option<bool>> = Mutex::new(None);

/// Ok if a peer with `uid` may be given an fd of a binding that is `writable`; else the reason, as the
/// exception its reply carries.
pub(super) fn may_hold_fd(uid: u32, writable: bool) -> std::result::Result<(), WireError> {
    if uid == 0 {
        return Ok(());
    }
    if !writable {
        return Err(WireError::new(
            Errno::EPERM,
            "an fd of a read-only loop device lets its holder rebind it to a file it may only write \
             (LOOP_CHANGE_FD): it is given for writable bindings only (open the backing file O_RDWR)",
        ));
    }
    if !clear_waits_for_last_close() {
        return Err(WireError::new(
            Errno::EPERM,
            "this kernel unbinds a loop device at LOOP_CLR_FD while an fd of it stays open, which could then \
             rebind it or reach the next file bound to it: an fd is given to root only (Linux 6.11 or later \
             keeps the binding until the last close)",
        ));
    }
    Ok(())
}

/// Whether the kernel keeps a device bound after `LOOP_CLR_FD` by its only opener until that opener
/// closes it. A probe error counts as no.
fn clear_waits_for_last_close() -> bool {
    let mut known = DEFERRED_CLEAR.lock().unwrap_or_else(|e| e.into_inner());
    if known.is_none() {
        *known = Some(probe().unwrap_or(false));
    }
    known.unwrap_or(false)
}

/// Binds a scratch memfd, clears the device through our only fd of it, and tries to bind it again through
/// that fd: EBUSY means the old binding is still there until we close.
fn probe() -> Result<bool> {
    let file = super::seqpacket::memfd(b"loopdev-clear-probe\0")?;
    nix::unistd::ftruncate(file.as_raw_fd(), 4096).map_err(|e| crate::error::Error::os(e, "ftruncate"))?;
    let ctl = LoopControl::open(None)?;
    let opts = ConfigureOptions::default();
    let lo = ctl.loop_for_fd(file.as_fd(), &opts, false, None::<fn(&crate::device::Loop) -> Result<()>>)?;
    lo.clear_fd()?;
    match lo.configure(file.as_fd(), &opts) {
        Err(e) if e.is(Errno::EBUSY) => Ok(true),
        Ok(()) => {
            // Rebound: an old kernel. Leave the device as we found it.
            let _ = lo.clear_fd();
            Ok(false)
        }
        Err(_) => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_may_always_hold_an_fd_and_others_never_of_a_read_only_binding() {
        assert!(may_hold_fd(0, false).is_ok());
        assert_eq!(may_hold_fd(65534, false).unwrap_err().errno, Errno::EPERM);
    }

    #[test]
    fn the_probe_leaves_no_device_bound_and_agrees_with_the_kernel_version() {
        let deferred = probe().unwrap();
        for entry in std::fs::read_dir("/sys/block").unwrap() {
            let backing = std::fs::read_to_string(entry.unwrap().path().join("loop/backing_file"));
            assert!(!backing.unwrap_or_default().contains("loopdev-clear-probe"), "the probe's device is bound");
        }
        let release = nix::sys::utsname::uname().unwrap();
        let release = release.release().to_string_lossy().into_owned();
        let mut parts = release.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
        let version = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        assert_eq!(deferred, version >= (6, 11), "kernel {release}");
    }
}
