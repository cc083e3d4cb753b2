//! Files named relative to a directory fd, and what their inodes are: the steps device, node and the
//! remote server share to find and check device nodes without following names twice.

use crate::error::{Error, Result};
use crate::uapi;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{fstat, makedev, FileStat, Mode, SFlag};
use std::os::unix::io::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// Where device nodes live when no directory fd is given.
pub const DEV_DIR: &str = "/dev";

/// `major:minor` as sysfs `dev` files hold it (`7:16\n`).
fn parse_devnum(text: &str) -> Option<u64> {
    let (major, minor) = text.trim_end().split_once(':')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(major) || !digits(minor) {
        return None;
    }
    Some(makedev(major.parse().ok()?, minor.parse().ok()?))
}

/// The device number of `loop<index>`: with loop.max_part set the kernel gives each device
/// `1 << part_shift` minors for its partitions, so the minor is not the index. The shift comes from the
/// driver's `max_part` parameter, read once per process for the real sysfs (the parameter is read-only
/// while the driver is loaded, and reading sysfs on every open doubled the syscalls of an attach); else
/// from the device's own `dev` file. Without a readable sysfs (a container without /sys) the kernel
/// default, minor = index, is the best guess left.
pub(crate) fn loop_devnum(sys: &Path, index: u32) -> u64 {
    let shift = if sys == Path::new(SYS_DIR) { cached_part_shift() } else { part_shift(sys) };
    let devnum = |minor: u32| makedev(u64::from(uapi::LOOP_MAJOR), u64::from(minor));
    match shift {
        Some(shift) => devnum(index << shift),
        None => std::fs::read_to_string(sys.join(format!("block/loop{index}/dev")))
            .ok()
            .and_then(|text| parse_devnum(&text))
            .unwrap_or_else(|| devnum(index)),
    }
}

/// Where the kernel describes its block devices and drivers.
pub(crate) const SYS_DIR: &str = "/sys";

/// The kernel's `part_shift`: `fls(max_part)`.
fn part_shift(sys: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(sys.join("module/loop/parameters/max_part")).ok()?;
    let max_part: u32 = text.trim().parse().ok()?;
    Some(u32::BITS - max_part.leading_zeros())
}

fn cached_part_shift() -> Option<u32> {
    const UNKNOWN: u32 = u32::MAX;
    const UNREADABLE: u32 = u32::MAX - 1;
    static SHIFT: AtomicU32 = AtomicU32::new(UNKNOWN);
    match SHIFT.load(Ordering::Relaxed) {
        UNKNOWN => {
            let shift = part_shift(Path::new(SYS_DIR));
            SHIFT.store(shift.unwrap_or(UNREADABLE), Ordering::Relaxed);
            shift
        }
        UNREADABLE => None,
        shift => Some(shift),
    }
}

/// The path a directory fd points at (`/dev` for none), for error messages only.
pub(crate) fn dir_path(dir: Option<BorrowedFd>) -> PathBuf {
    dir.map_or_else(|| PathBuf::from(DEV_DIR), fd_path)
}

/// The path an fd points at as the kernel names it, for error messages only.
pub(crate) fn fd_path(fd: BorrowedFd) -> PathBuf {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .unwrap_or_else(|_| PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())))
}

/// `openat` returning an owned fd, with the path in the error.
pub(crate) fn open_in(dir: Option<BorrowedFd>, name: &str, flags: OFlag) -> Result<OwnedFd> {
    let dirfd = dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    let target = if dir.is_some() { PathBuf::from(name) } else { dir_path(None).join(name) };
    // The directory's name is looked up only for an error: a readlink per open showed in every request.
    let raw = openat(dirfd, &target, flags | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| Error::os(e, "open").with_path(&dir_path(dir).join(name)))?;
    // SAFETY: openat just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

pub(crate) fn stat_fd(fd: BorrowedFd) -> Result<FileStat> {
    fstat(fd.as_raw_fd()).map_err(|e| Error::os(e, "fstat"))
}

/// The id of the mount `fd` is on (`mnt_id` in /proc/self/fdinfo, Linux ≥ 3.15): two fds on different
/// mounts of one filesystem have the same st_dev but not the same mount id.
pub(crate) fn mount_id(fd: BorrowedFd) -> Result<u64> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))
        .map_err(|e| Error::os(nix::errno::Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO)), "read fdinfo"))?;
    info.lines()
        .find_map(|l| l.strip_prefix("mnt_id:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| Error::os(nix::errno::Errno::ENOTSUP, "read fdinfo").with_detail("no mnt_id (Linux < 3.15?)"))
}

pub(crate) fn is_kind(st: &FileStat, kind: SFlag) -> bool {
    st.st_mode & SFlag::S_IFMT.bits() == kind.bits()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysfs_dev_numbers_parse_and_nothing_else_does() {
        assert_eq!(parse_devnum("7:16\n"), Some(makedev(7, 16)));
        assert_eq!(parse_devnum("259:1048575"), Some(makedev(259, 1_048_575)));
        for bad in ["", "7", "7:", ":16", "7:16:1", "7:-1", "7: 16", "x:1", "7:99999999999999999999"] {
            assert_eq!(parse_devnum(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_driver_max_part_gives_the_minor_of_each_index() {
        let sys = std::env::temp_dir().join(format!("loopdev-sys-{}", std::process::id()));
        std::fs::create_dir_all(sys.join("module/loop/parameters")).unwrap();
        for (max_part, index, minor) in [(0, 5, 5), (1, 5, 10), (15, 1, 16), (16, 2, 64), (31, 3, 96)] {
            std::fs::write(sys.join("module/loop/parameters/max_part"), format!("{max_part}\n")).unwrap();
            assert_eq!(loop_devnum(&sys, index), makedev(7, minor), "max_part {max_part}, loop{index}");
        }
        std::fs::remove_dir_all(&sys).unwrap();
        // This machine's: the same as each device's sysfs `dev` file.
        assert_eq!(loop_devnum(Path::new(SYS_DIR), 0), loop_devnum(Path::new("/nonexistent-sys"), 0));
    }

    #[test]
    fn without_sysfs_the_minor_is_taken_to_be_the_index() {
        assert_eq!(loop_devnum(Path::new("/nonexistent"), 5), makedev(7, 5));
    }
}
