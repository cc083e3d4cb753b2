//! `Loop`: one open loop block device and the operations on it.

use crate::error::{Error, Kind, Result};
use crate::info::LoopInfo;
pub use crate::inode::DEV_DIR;
use crate::inode::{dir_path, is_kind, loop_devnum, open_in, stat_fd, SYS_DIR};
use crate::ioctl;
use crate::node::{self, Node};
use crate::partition;
use crate::uapi::{self, LoopConfig, LoopInfo64};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::stat::{self, major, FileStat, SFlag};
use std::os::unix::io::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// What LOOP_CONFIGURE sets in one step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigureOptions {
    pub offset: u64,
    /// 0 = up to the end of the backing file.
    pub size_limit: u64,
    /// Logical sector size; 0 = the kernel's default.
    pub block_size: u32,
    pub autoclear: bool,
    pub partscan: bool,
    pub read_only: bool,
    pub direct_io: bool,
    /// Stored in lo_file_name (what LOOP_GET_STATUS64 and old losetup show), truncated to 63 bytes. The kernel
    /// keeps the real path in sysfs `loop/backing_file` anyway, so it is left empty unless given: looking
    /// the name up from the fd would cost a readlink on every bind.
    pub file_name: Option<String>,
}

impl ConfigureOptions {
    fn flags(&self) -> u32 {
        [
            (self.autoclear, uapi::LO_FLAGS_AUTOCLEAR),
            (self.partscan, uapi::LO_FLAGS_PARTSCAN),
            (self.read_only, uapi::LO_FLAGS_READ_ONLY),
            (self.direct_io, uapi::LO_FLAGS_DIRECT_IO),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .fold(0, |acc, (_, flag)| acc | flag)
    }
}

/// A read-modify-write of the status; `None` keeps the current value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatusChange {
    pub offset: Option<u64>,
    pub size_limit: Option<u64>,
    pub autoclear: Option<bool>,
    pub partscan: Option<bool>,
    pub read_only: Option<bool>,
}

#[derive(Debug)]
pub struct Loop {
    fd: OwnedFd,
    minor: u32,
    /// The device number, which is 7:(N << part_shift) rather than 7:N when loop.max_part is set.
    rdev: u64,
    path: PathBuf,
}

/// The kernel binds only regular files and block devices; say so instead of a bare EINVAL later.
pub(crate) fn check_backing(fd: BorrowedFd) -> Result<FileStat> {
    let st = stat_fd(fd)?;
    if is_kind(&st, SFlag::S_IFREG) || is_kind(&st, SFlag::S_IFBLK) {
        Ok(st)
    } else {
        // Named after the backing file, not the device: callers add the device's path, and the first one wins.
        Err(Error::os(Errno::EINVAL, "fstat")
            .with_path(&crate::inode::fd_path(fd))
            .with_detail("backing file is not a regular file or block device"))
    }
}

impl Loop {
    /// Opens `<dir>/loop<minor>` (default `/dev`) read-write and checks it is that loop device: a block
    /// device with the number sysfs gives for `loop<minor>`.
    pub fn open(minor: u32, dir: Option<BorrowedFd>) -> Result<Loop> {
        Loop::open_described_by(minor, dir, Path::new(SYS_DIR))
    }

    fn open_described_by(minor: u32, dir: Option<BorrowedFd>, sys: &Path) -> Result<Loop> {
        let name = format!("loop{minor}");
        let fd = open_in(dir, &name, OFlag::O_RDWR)?;
        let path = dir_path(dir).join(&name);
        let st = stat_fd(fd.as_fd()).map_err(|e| e.with_path(&path))?;
        let rdev = st.st_rdev;
        let expected = loop_devnum(sys, minor);
        if !is_kind(&st, SFlag::S_IFBLK) || major(rdev) != u64::from(uapi::LOOP_MAJOR) || rdev != expected {
            let (want_major, want_minor) = (major(expected), stat::minor(expected));
            return Err(Error {
                kind: Kind::UnexpectedDevice { expected_minor: want_minor as u32, rdev, mode: st.st_mode },
                detail: Some(format!("not loop device {want_major}:{want_minor}")),
                ..Error::os(Errno::ENODEV, "open").with_path(&path)
            });
        }
        Ok(Loop { fd, minor, rdev, path })
    }

    /// N of `loopN`: the loop index, which is the device's minor only while loop.max_part is 0 (see `rdev`).
    pub fn minor(&self) -> u32 {
        self.minor
    }
    /// The device number (`st_rdev`), as sysfs `/sys/block/loopN/dev` gives it.
    pub fn rdev(&self) -> u64 {
        self.rdev
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn devname(&self) -> String {
        format!("loop{}", self.minor)
    }

    fn ioctl_err(&self, name: &'static str) -> impl Fn(Errno) -> Error + '_ {
        move |e| Error::ioctl(e, name).with_path(&self.path)
    }

    /// flock(2) with `LOCK_*` bits; EWOULDBLOCK when `LOCK_NB` and someone else holds it.
    pub fn flock(&self, op: i32) -> Result<()> {
        ioctl::flock(self.fd.as_fd(), op).map_err(|e| Error::os(e, "flock").with_path(&self.path))
    }

    /// BLKFLSBUF.
    pub fn flush_buf(&self) -> Result<()> {
        ioctl::flush_buf(self.fd.as_fd()).map_err(self.ioctl_err("BLKFLSBUF"))
    }

    /// LOOP_SET_FD (legacy; prefer `configure`).
    pub fn set_fd(&self, backing: BorrowedFd) -> Result<()> {
        check_backing(backing).map_err(|e| e.with_path(&self.path))?;
        ioctl::set_fd(self.fd.as_fd(), backing).map_err(self.ioctl_err("LOOP_SET_FD"))
    }

    /// LOOP_CLR_FD.
    pub fn clear_fd(&self) -> Result<()> {
        ioctl::clr_fd(self.fd.as_fd()).map_err(self.ioctl_err("LOOP_CLR_FD"))
    }

    /// Verified detach of `backing`: if the device is bound to that file (dev/ino), LOOP_CLR_FD, then wait
    /// until it no longer is. A device that is unbound or bound to another file is left alone (Ok): the
    /// check comes first, so this never clears someone else's binding.
    ///
    /// What Ok guarantees: after our LOOP_CLR_FD, LOOP_GET_STATUS64 on our fd found the device unbound or
    /// being torn down. The kernel lets a clear proceed only when ours is the device's only open, so at that
    /// point nobody else had the file through this device. It does *not*
    /// say the kernel has released the file: on Linux ≥ 6.11 the teardown runs at the last close of our open
    /// file description (this Loop's `close`, and any dup of its fd), before that synchronously. While
    /// someone else holds the device open the clear only sets autoclear; at the timeout (ETIMEDOUT) the
    /// device is still bound, and the error says whether this call set autoclear, which detaches the device
    /// at its last close.
    pub fn clear_fd_wait(&self, backing: BorrowedFd, timeout: Duration, poll: Duration) -> Result<()> {
        let st = stat_fd(backing).map_err(|e| e.with_path(&self.path))?;
        match self.get_status() {
            Err(e) if e.is(Errno::ENXIO) => Ok(()),
            Err(e) => Err(e),
            Ok(info) if !info.is_bound_to(st.st_dev, st.st_ino) => Ok(()),
            Ok(info) => self.clear_and_wait(&info, timeout, poll),
        }
    }

    /// Verified detach of whatever is bound now: `clear_fd_wait` for the current backing file.
    /// Unbound already = done.
    pub fn detach(&self, timeout: Duration, poll: Duration) -> Result<()> {
        match self.get_status() {
            Err(e) if e.is(Errno::ENXIO) => Ok(()),
            Err(e) => Err(e),
            Ok(info) => self.clear_and_wait(&info, timeout, poll),
        }
    }

    /// LOOP_CLR_FD while someone else has the device open only marks it autoclear, and our own open fd then
    /// keeps it bound after they close. So the clear is repeated on every poll while the device is still bound
    /// to the same file; once we are the only opener, it takes effect. A device we hold open cannot be
    /// unbound (and then rebound by someone else) before our own clear, so `bound` still describes it.
    fn clear_and_wait(&self, bound: &LoopInfo, timeout: Duration, poll: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.clear_fd() {
                Err(e) if e.is(Errno::ENXIO) => return Ok(()),
                other => other?,
            }
            match self.get_status() {
                Err(e) if e.is(Errno::ENXIO) => return Ok(()),
                Err(e) => return Err(e),
                Ok(info) if !info.is_bound_to(bound.device, bound.inode) => return Ok(()),
                Ok(_) => {}
            }
            let now = Instant::now();
            if now >= deadline {
                let autoclear =
                    if bound.autoclear() { "it was autoclear already" } else { "LOOP_CLR_FD set autoclear on it" };
                return Err(Error {
                    kind: Kind::Timeout,
                    detail: Some(format!(
                        "device still bound after {} ms (open elsewhere); {autoclear}: the kernel detaches it at \
                         its last close",
                        timeout.as_millis()
                    )),
                    ..Error::ioctl(Errno::ETIMEDOUT, "LOOP_CLR_FD").with_path(&self.path)
                });
            }
            std::thread::sleep(poll.min(deadline - now));
        }
    }

    /// LOOP_CHANGE_FD.
    pub fn change_fd(&self, backing: BorrowedFd) -> Result<()> {
        check_backing(backing).map_err(|e| e.with_path(&self.path))?;
        ioctl::change_fd(self.fd.as_fd(), backing).map_err(self.ioctl_err("LOOP_CHANGE_FD"))
    }

    /// Whether the device is bound to the inode behind `backing` (false when unbound).
    pub fn is_bound_to(&self, backing: BorrowedFd) -> Result<bool> {
        let st = stat_fd(backing)?;
        match self.get_status() {
            Ok(info) => Ok(info.is_bound_to(st.st_dev, st.st_ino)),
            Err(e) if e.is(Errno::ENXIO) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// LOOP_GET_STATUS64.
    pub fn get_status(&self) -> Result<LoopInfo> {
        ioctl::get_status64(self.fd.as_fd())
            .map(|raw| LoopInfo::from(&raw))
            .map_err(self.ioctl_err("LOOP_GET_STATUS64"))
    }

    /// LOOP_SET_STATUS64 as read-modify-write. On a bound device the kernel takes read-only-ness from the
    /// backing file's open mode and never clears partscan; it ignores such a request silently, after applying
    /// the rest of the change. So those are refused up front (EINVAL) and the device is left as it was.
    pub fn set_status(&self, change: &StatusChange) -> Result<()> {
        let mut raw = ioctl::get_status64(self.fd.as_fd()).map_err(self.ioctl_err("LOOP_GET_STATUS64"))?;
        let has = |flag: u32| raw.lo_flags & flag != 0;
        let refusal = match (change.read_only, change.partscan) {
            (Some(ro), _) if ro != has(uapi::LO_FLAGS_READ_ONLY) => Some(if ro {
                "the kernel cannot make a bound device read-only (it follows the backing file's open mode)"
            } else {
                "the kernel cannot make a bound read-only device writable (it follows the backing file's open mode)"
            }),
            (_, Some(false)) if has(uapi::LO_FLAGS_PARTSCAN) => {
                Some("the kernel cannot turn partition scanning off on a bound device")
            }
            _ => None,
        };
        if let Some(why) = refusal {
            return Err(Error::ioctl(Errno::EINVAL, "LOOP_SET_STATUS64")
                .with_path(&self.path)
                .with_detail(format!("{why}; nothing was changed")));
        }
        if let Some(offset) = change.offset {
            raw.lo_offset = offset;
        }
        if let Some(limit) = change.size_limit {
            raw.lo_sizelimit = limit;
        }
        for (value, flag) in [(change.autoclear, uapi::LO_FLAGS_AUTOCLEAR), (change.partscan, uapi::LO_FLAGS_PARTSCAN)]
        {
            match value {
                Some(true) => raw.lo_flags |= flag,
                Some(false) => raw.lo_flags &= !flag,
                None => {}
            }
        }
        ioctl::set_status64(self.fd.as_fd(), &raw).map_err(self.ioctl_err("LOOP_SET_STATUS64"))
    }

    /// Binds `backing` with LOOP_CONFIGURE; on kernels without it (before 5.8) falls back to LOOP_SET_FD +
    /// LOOP_SET_STATUS64 (+ block size, direct I/O). An EINVAL on a kernel that has LOOP_CONFIGURE is a bad
    /// parameter and is returned as such. If a fallback step after the bind fails, the bind we made is undone
    /// and that step's error is returned (its ioctl names the step).
    pub fn configure(&self, backing: BorrowedFd, opts: &ConfigureOptions) -> Result<()> {
        let mut info = LoopInfo64 {
            lo_offset: opts.offset,
            lo_sizelimit: opts.size_limit,
            lo_flags: opts.flags(),
            ..Default::default()
        };
        if let Some(name) = &opts.file_name {
            let n = name.len().min(uapi::LO_NAME_SIZE - 1);
            info.lo_file_name[..n].copy_from_slice(&name.as_bytes()[..n]);
        }
        let config =
            LoopConfig { fd: backing.as_raw_fd() as u32, block_size: opts.block_size, info, ..Default::default() };
        let attempt = if legacy_forced() { Err(Errno::ENOTTY) } else { ioctl::configure(self.fd.as_fd(), &config) };
        match attempt {
            Ok(()) => Ok(()),
            Err(e @ (Errno::EINVAL | Errno::ENOTTY | Errno::ENOSYS)) => {
                // A backing fd of the wrong kind also gives EINVAL: say so rather than try the old path.
                // (Checked only on failure, to keep the common bind at one syscall.)
                check_backing(backing).map_err(|e| e.with_path(&self.path))?;
                if e == Errno::EINVAL && self.has_configure() {
                    return Err(Error::ioctl(e, "LOOP_CONFIGURE").with_path(&self.path));
                }
                self.configure_legacy(backing, opts, &info)
            }
            Err(e) => Err(Error::ioctl(e, "LOOP_CONFIGURE").with_path(&self.path)),
        }
    }

    /// Whether the kernel knows LOOP_CONFIGURE (asked once per process): where it exists, an fd of -1 is
    /// refused with EBADF before anything else is looked at; before 5.8 the unknown ioctl is EINVAL.
    fn has_configure(&self) -> bool {
        static KNOWN: AtomicU8 = AtomicU8::new(0);
        match KNOWN.load(Ordering::Relaxed) {
            1 => true,
            2 => false,
            _ => {
                let probe = LoopConfig { fd: u32::MAX, ..Default::default() };
                let has = ioctl::configure(self.fd.as_fd(), &probe) == Err(Errno::EBADF);
                KNOWN.store(if has { 1 } else { 2 }, Ordering::Relaxed);
                has
            }
        }
    }

    /// The pre-5.8 path: bind, then set what LOOP_CONFIGURE would have set in the same call.
    fn configure_legacy(&self, backing: BorrowedFd, opts: &ConfigureOptions, info: &LoopInfo64) -> Result<()> {
        // LOOP_SET_FD takes read-only-ness from the fd's open mode alone (SET_STATUS cannot set it), and the
        // fd is never reopened by path: it may be someone else's, whose path means something else to us.
        if opts.read_only
            && fcntl(backing.as_raw_fd(), FcntlArg::F_GETFL).map_or(true, |fl| fl & libc::O_ACCMODE != libc::O_RDONLY)
        {
            return Err(Error::ioctl(Errno::EINVAL, "LOOP_SET_FD").with_path(&self.path).with_detail(
                "a read-only binding of a file opened for writing needs LOOP_CONFIGURE (Linux 5.8); open it O_RDONLY",
            ));
        }
        ioctl::set_fd(self.fd.as_fd(), backing).map_err(self.ioctl_err("LOOP_SET_FD"))?;
        self.legacy_settings(opts, info).map_err(|e| {
            // We bound it a moment ago, so clearing it cannot take someone else's device.
            let _ = ioctl::clr_fd(self.fd.as_fd());
            e
        })
    }

    fn legacy_settings(&self, opts: &ConfigureOptions, info: &LoopInfo64) -> Result<()> {
        // Of the flags, SET_STATUS64 sets only these; read-only came with the fd, direct I/O has its own ioctl.
        let status =
            LoopInfo64 { lo_flags: info.lo_flags & (uapi::LO_FLAGS_AUTOCLEAR | uapi::LO_FLAGS_PARTSCAN), ..*info };
        retry_eagain(|| ioctl::set_status64(self.fd.as_fd(), &status)).map_err(self.ioctl_err("LOOP_SET_STATUS64"))?;
        if opts.block_size != 0 {
            retry_eagain(|| ioctl::set_block_size(self.fd.as_fd(), opts.block_size))
                .map_err(self.ioctl_err("LOOP_SET_BLOCK_SIZE"))?;
        }
        if opts.direct_io {
            // Best effort, as LOOP_CONFIGURE treats the flag: a file system without O_DIRECT stays buffered.
            let _ = ioctl::set_direct_io(self.fd.as_fd(), true);
        }
        Ok(())
    }

    /// LOOP_SET_DIRECT_IO.
    pub fn set_direct_io(&self, on: bool) -> Result<()> {
        ioctl::set_direct_io(self.fd.as_fd(), on).map_err(self.ioctl_err("LOOP_SET_DIRECT_IO"))
    }

    /// LOOP_SET_BLOCK_SIZE.
    pub fn set_block_size(&self, size: u32) -> Result<()> {
        ioctl::set_block_size(self.fd.as_fd(), size).map_err(self.ioctl_err("LOOP_SET_BLOCK_SIZE"))
    }

    /// LOOP_SET_CAPACITY.
    pub fn set_capacity(&self) -> Result<()> {
        ioctl::set_capacity(self.fd.as_fd()).map_err(self.ioctl_err("LOOP_SET_CAPACITY"))
    }

    /// Makes `loopN` usable inside `dir` (a container's /dev). Like osbuild: bind-mount this device's node onto
    /// an empty file (device nodes made by mknod are often unusable in a container's tmpfs), else mknod a block
    /// device with this device's number. `dir` may be someone else's: see `node`. Undo with `Node::remove`, or by name with
    /// `remove_node`.
    pub fn mknod(&self, dir: BorrowedFd, mode: u32) -> Result<Node> {
        node::make(dir, &self.devname(), self.fd.as_fd(), self.rdev, mode)
    }

    /// The partition table on the device (GPT or MBR), read through this fd at the device's logical sector
    /// size; `None` when there is none, `Kind::PartitionTable` when it cannot be trusted.
    pub fn partition_table(&self) -> Result<Option<partition::Table>> {
        let disk = partition::FdDisk::new(self.fd.as_fd()).map_err(|e| e.with_path(&self.path))?;
        partition::read(&disk).map_err(|e| e.with_path(&self.path))
    }

    /// BLKPG_ADD_PARTITION for every partition of the table that the kernel has not created (`partx -a`).
    pub fn add_partitions(&self) -> Result<partition::register::Registration> {
        partition::register::add(self.fd.as_fd()).map_err(|e| e.with_path(&self.path))
    }

    /// BLKPG_DEL_PARTITION of partition `number`; Ok when it is already gone.
    pub fn remove_partition(&self, number: u32) -> Result<()> {
        partition::register::remove(self.fd.as_fd(), number).map_err(|e| e.with_path(&self.path))
    }

    /// A second `Loop` on the same open file description (same flock), for handing out temporarily.
    pub fn try_clone(&self) -> Result<Loop> {
        let fd = self.fd.try_clone().map_err(|e| Error::os(Errno::from_i32(e.raw_os_error().unwrap_or(0)), "dup"))?;
        Ok(Loop { fd, minor: self.minor, rdev: self.rdev, path: self.path.clone() })
    }
}

/// Runs `op` again while it fails with EAGAIN, at most 64 times, pausing 10 ms plus a growing random part
/// (systemd's loop). Linux 5.0–5.7 answer EAGAIN to LOOP_SET_STATUS64 / LOOP_SET_BLOCK_SIZE while someone
/// (udev probing the fresh device) still has pages cached; osbuild and systemd retry likewise.
fn retry_eagain<T>(mut op: impl FnMut() -> ioctl::Result<T>) -> ioctl::Result<T> {
    let mut attempts = 0u64;
    loop {
        match op() {
            Err(Errno::EAGAIN) if attempts < 63 => {
                attempts += 1;
                let mut r = 0u64;
                // SAFETY: getrandom writes at most the 8 bytes we pass; a short read leaves r at 0, which is fine.
                unsafe { libc::getrandom(&mut r as *mut u64 as *mut libc::c_void, 8, libc::GRND_NONBLOCK) };
                let jitter = r % (240_000 * attempts / 64 + 1);
                std::thread::sleep(Duration::from_micros(10_000 + jitter));
            }
            other => return other,
        }
    }
}

/// `LOOPDEV_FORCE_LEGACY_CONFIGURE=1` (test-only, read once): configure as on a kernel before 5.8, so the
/// fallback path runs on a real kernel.
fn legacy_forced() -> bool {
    static FORCED: AtomicU8 = AtomicU8::new(0);
    match FORCED.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var_os("LOOPDEV_FORCE_LEGACY_CONFIGURE").map_or(false, |v| v == "1");
            FORCED.store(if on { 1 } else { 2 }, Ordering::Relaxed);
            on
        }
        v => v == 1,
    }
}

impl AsFd for Loop {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::stat::{makedev, Mode};

    #[test]
    fn flags_follow_options() {
        let o = ConfigureOptions { autoclear: true, direct_io: true, ..Default::default() };
        assert_eq!(o.flags(), uapi::LO_FLAGS_AUTOCLEAR | uapi::LO_FLAGS_DIRECT_IO);
        assert_eq!(ConfigureOptions::default().flags(), 0);
    }

    #[test]
    fn opening_a_non_loop_node_is_an_unexpected_device() {
        // A "loop5" that is really /dev/null (char 1:3): open succeeds, the check must refuse it.
        let tmp = std::env::temp_dir().join(format!("loopdev-unexpected-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).unwrap();
        std::os::unix::fs::symlink("/dev/null", tmp.join("loop5")).unwrap();
        let dir = open_in(None, tmp.to_str().unwrap(), OFlag::O_DIRECTORY | OFlag::O_RDONLY).unwrap();
        let err = Loop::open(5, Some(dir.as_fd())).unwrap_err();
        std::fs::remove_dir_all(&tmp).unwrap();
        assert_eq!(err.code(), "ERR_LOOP_UNEXPECTED_DEVICE");
        assert!(matches!(err.kind, Kind::UnexpectedDevice { expected_minor: 5, .. }));
        assert_eq!(err.path, Some(tmp.join("loop5")));
    }

    #[test]
    fn eagain_is_retried_and_other_errors_are_not() {
        let mut calls = 0;
        let r = retry_eagain(|| {
            calls += 1;
            if calls < 3 {
                Err(Errno::EAGAIN)
            } else {
                Ok(calls)
            }
        });
        assert_eq!(r, Ok(3));
        let mut calls = 0;
        assert_eq!(
            retry_eagain(|| -> ioctl::Result<()> {
                calls += 1;
                Err(Errno::EINVAL)
            }),
            Err(Errno::EINVAL)
        );
        assert_eq!(calls, 1);
    }

    /// A kernel with loop.max_part=15 (part_shift 4) numbers loop1 7:16. Simulated with a sysfs and a /dev of
    /// our own: `loop1` there is a node for a real, free loop device whose minor is not 1.
    #[test]
    fn the_device_number_comes_from_sysfs_not_from_the_index() {
        let ctl = crate::LoopControl::open(None).unwrap();
        let real = ctl.get_unbound().unwrap();
        let index = real + 1;
        let tmp = std::env::temp_dir().join(format!("loopdev-max-part-{}", std::process::id()));
        let (sys, dev) = (tmp.join("sys"), tmp.join("dev"));
        std::fs::create_dir_all(sys.join(format!("block/loop{index}"))).unwrap();
        std::fs::create_dir_all(&dev).unwrap();
        std::fs::write(sys.join(format!("block/loop{index}/dev")), format!("7:{real}\n")).unwrap();
        let node = dev.join(format!("loop{index}"));
        stat::mknod(&node, SFlag::S_IFBLK, Mode::from_bits_truncate(0o600), makedev(7, u64::from(real))).unwrap();
        let dir = open_in(None, dev.to_str().unwrap(), OFlag::O_DIRECTORY | OFlag::O_RDONLY).unwrap();
        let opened = Loop::open_described_by(index, Some(dir.as_fd()), &sys).map(|lo| (lo.minor(), lo.rdev()));
        // The same node under the kernel default (minor = index) is someone else's device.
        std::fs::write(sys.join(format!("block/loop{index}/dev")), format!("7:{index}\n")).unwrap();
        let refused = Loop::open_described_by(index, Some(dir.as_fd()), &sys).unwrap_err();
        std::fs::remove_dir_all(&tmp).unwrap();
        assert_eq!(opened, Ok((index, makedev(7, u64::from(real)))));
        assert_eq!(refused.code(), "ERR_LOOP_UNEXPECTED_DEVICE");
        assert_eq!(
            refused.to_string().split(',').next(),
            Some(&*format!("ERR_LOOP_UNEXPECTED_DEVICE: not loop device 7:{index}"))
        );
    }

    #[test]
    fn a_missing_node_reports_open_and_the_path() {
        let err = Loop::open(987_654, None).unwrap_err();
        assert_eq!(err.code(), "ENOENT");
        assert_eq!(err.syscall, "open");
        assert_eq!(err.path.as_deref(), Some(Path::new("/dev/loop987654")));
    }

    #[test]
    fn a_directory_is_not_a_backing_file() {
        let dir = open_in(None, "/tmp", OFlag::O_RDONLY | OFlag::O_DIRECTORY).unwrap();
        let err = check_backing(dir.as_fd()).unwrap_err();
        assert_eq!(err.code(), "EINVAL");
    }
}
