//! `LoopControl::attach`: bind a backing fd to a free loop device and check that the kernel applied what was
//! asked, as systemd's `loop_configure` + `loop_configure_verify` (loop-util.c) do.
//!
//! get-free → open → (lock) → configure (all `loop_for_fd`) → read back what the kernel applied → compare.
//! A device that does not show what was asked is released and the bind tried again on a fresh one, at most
//! `VERIFY_ATTEMPTS` times; then the differences are the error (`Kind::ConfigMismatch`). Direct I/O asked
//! for and refused (alignment, sector size) on an fd with O_DIRECT is not a mismatch but a fallback: the
//! kernel would still do direct I/O through the fd's own O_DIRECT, so the device is released, O_DIRECT is
//! cleared on the fd (when it is ours to change) and the file bound again buffered.

use crate::control::LoopControl;
use crate::device::{check_backing, ConfigureOptions, Loop};
use crate::error::{Error, Kind, Result};
use crate::inode::is_kind;
use crate::ioctl;
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::stat::{FileStat, SFlag};
use std::os::unix::io::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;
use std::time::Duration;

/// How often a binding that does not verify is tried on a fresh device before giving up.
pub const VERIFY_ATTEMPTS: u32 = 2;

/// The kernel sizes loop devices in 512-byte sectors, whatever the logical sector size.
const SECTOR: u64 = 512;

/// How long releasing a device that failed verification may wait for the kernel to let go of it.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);
const RELEASE_POLL: Duration = Duration::from_millis(10);

/// What `attach` is asked to do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttachOptions {
    /// What LOOP_CONFIGURE sets. `file_name` also names the backing file in errors.
    pub configure: ConfigureOptions,
    /// Hold `flock(LOCK_EX)` on the device (see `LoopControl::loop_for_fd`).
    pub lock: bool,
    /// The backing fd's open file description is this call's to change (the caller opened it for the attach):
    /// when direct I/O is refused on it while it has O_DIRECT, O_DIRECT is cleared and the file bound again
    /// buffered. Without it, a caller's fd is used as it is.
    pub owns_fd: bool,
}

/// What the kernel applied, read back right after binding (LOOP_GET_STATUS64, BLKGETSIZE64, BLKSSZGET, sysfs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub offset: u64,
    pub size_limit: u64,
    /// Device size in bytes.
    pub size: u64,
    /// Logical sector size in bytes.
    pub block_size: u32,
    pub read_only: bool,
    pub partscan: bool,
    pub autoclear: bool,
    pub direct_io: bool,
    /// sysfs `loop/backing_file` as the kernel prints it.
    pub backing_file: String,
    /// sysfs `diskseq` (changes with every bind); None on kernels without it.
    pub diskseq: Option<u64>,
    /// `st_dev` / `st_ino` of the file the device is bound to (`lo_device` / `lo_inode`).
    pub device: u64,
    pub inode: u64,
}

/// A device bound and verified by `attach`; dropping `lo` closes it (with autoclear, that detaches it).
#[derive(Debug)]
pub struct Attached {
    pub lo: Loop,
    pub applied: Applied,
}

/// What `attach` expects to read back.
struct Expected<'a> {
    dev: u64,
    ino: u64,
    size: u64,
    opts: &'a ConfigureOptions,
}

impl LoopControl {
    /// Binds `backing` to a free loop device and verifies what the kernel applied: offset, size limit, size
    /// (the backing size after offset and size limit, rounded down to 512 bytes), sector size when one is
    /// asked, read-only, partscan when asked, autoclear, and that the device is bound to `backing`'s inode.
    ///
    /// Errors before any device is touched: a backing file that is not a regular file or block device, is
    /// empty, or leaves less than a sector after the offset (EINVAL, syscall `fstat`). After
    /// `VERIFY_ATTEMPTS` devices that did not verify: `Kind::ConfigMismatch` listing the differences. Nothing
    /// this call bound stays bound when it fails.
    pub fn attach(&self, backing: BorrowedFd, opts: &AttachOptions) -> Result<Attached> {
        self.attach_verified_by(backing, opts, verify)
    }

    /// `attach` with the comparison passed in, so tests can make the kernel "disagree".
    fn attach_verified_by(
        &self,
        backing: BorrowedFd,
        opts: &AttachOptions,
        mut verify: impl FnMut(&Applied, &Expected) -> Vec<String>,
    ) -> Result<Attached> {
        let path = opts.configure.file_name.as_deref().map(Path::new);
        let named = |e: Error| match path {
            Some(p) => e.with_path(p),
            None => e,
        };
        let (st, size) = mapped_size(backing, &opts.configure).map_err(named)?;
        let want = Expected { dev: st.st_dev, ino: st.st_ino, size, opts: &opts.configure };
        let mut config = opts.configure.clone();
        let mut odirect = opts.owns_fd && config.direct_io && has_odirect(backing).map_err(named)?;
        let mut differences = Vec::new();
        let mut attempt = 0;
        while attempt < VERIFY_ATTEMPTS {
            let lo = self.loop_for_fd::<Error, fn(&Loop) -> Result<()>>(backing, &config, opts.lock, None)?;
            let got = match read_applied(&lo) {
                Ok(got) => got,
                Err(e) => {
                    // Cannot even read it back: give the device up (it carries our binding) and say why.
                    let _ = release(&lo, backing);
                    return Err(e);
                }
            };
            differences = match &got {
                Some(applied) => verify(applied, &want),
                None => vec!["the device is not bound according to sysfs".to_string()],
            };
            let dio_refused = config.direct_io && got.as_ref().map_or(false, |a| !a.direct_io);
            if differences.is_empty() && !(dio_refused && odirect) {
                // `got` is Some: an unbound device always differs.
                if let Some(applied) = got {
                    return Ok(Attached { lo, applied });
                }
            }
            release(&lo, backing)?;
            drop(lo);
            if differences.is_empty() {
                // Direct I/O refused on an O_DIRECT fd: bind again buffered, through the same fd without
                // O_DIRECT (it is ours, see `owns_fd`). Not counted as an attempt: it happens once.
                clear_odirect(backing).map_err(named)?;
                odirect = false;
                config.direct_io = false;
                continue;
            }
            attempt += 1;
        }
        Err(named(Error {
            kind: Kind::ConfigMismatch { differences: differences.clone() },
            ..Error::ioctl(Errno::EIO, "LOOP_CONFIGURE").with_detail(format!(
                "the kernel did not apply the requested configuration ({}) after {VERIFY_ATTEMPTS} attempts",
                differences.join("; ")
            ))
        }))
    }
}

/// The backing file's stat and the size in bytes of the device `o` makes of it. EINVAL (syscall `fstat`)
/// when it is not a regular file or block device, or maps less than a sector after the offset: the kernel
/// would bind it anyway, as an empty device. The server asks it too, so that its peers get the same refusal.
pub(crate) fn mapped_size(backing: BorrowedFd, o: &ConfigureOptions) -> Result<(FileStat, u64)> {
    let st = check_backing(backing)?;
    let size = expected_size(backing_size(backing, &st)?, o)?;
    Ok((st, size))
}

/// Bytes the backing file holds: `st_size` for a file, BLKGETSIZE64 for a block device.
fn backing_size(backing: BorrowedFd, st: &FileStat) -> Result<u64> {
    if is_kind(st, SFlag::S_IFBLK) {
        ioctl::blk_size(backing).map_err(|e| Error::ioctl(e, "BLKGETSIZE64"))
    } else {
        Ok(st.st_size as u64)
    }
}

/// The device size the kernel should produce: what is left after the offset, capped by the size limit,
/// rounded down to whole 512-byte sectors.
fn expected_size(file_size: u64, o: &ConfigureOptions) -> Result<u64> {
    let fail = |detail: String| Error::os(Errno::EINVAL, "fstat").with_detail(detail);
    if file_size == 0 {
        return Err(fail("backing file is empty".to_string()));
    }
    if o.offset >= file_size {
        return Err(fail(format!(
            "offset {} is at or beyond the end of the backing file ({file_size} bytes)",
            o.offset
        )));
    }
    let mut size = file_size - o.offset;
    if o.size_limit > 0 && o.size_limit < size {
        size = o.size_limit;
    }
    size -= size % SECTOR;
    if size == 0 {
        return Err(fail(format!("less than one {SECTOR}-byte sector to map after offset {}", o.offset)));
    }
    Ok(size)
}

/// What the kernel applied to `lo`; None when the device turns out unbound.
fn read_applied(lo: &Loop) -> Result<Option<Applied>> {
    let info = match lo.get_status() {
        Ok(info) => info,
        Err(e) if e.is(Errno::ENXIO) => return Ok(None),
        Err(e) => return Err(e),
    };
    let fd = lo.as_fd();
    let size = ioctl::blk_size(fd).map_err(|e| Error::ioctl(e, "BLKGETSIZE64").with_path(lo.path()))?;
    let block_size = ioctl::blk_sector_size(fd).map_err(|e| Error::ioctl(e, "BLKSSZGET").with_path(lo.path()))?;
    let sys = Path::new("/sys/block").join(lo.devname());
    let backing_file = match std::fs::read_to_string(sys.join("loop/backing_file")) {
        Ok(text) => text.strip_suffix('\n').unwrap_or(&text).to_string(),
        Err(_) => return Ok(None),
    };
    let diskseq = std::fs::read_to_string(sys.join("diskseq")).ok().and_then(|s| s.trim().parse().ok());
    Ok(Some(Applied {
        offset: info.offset,
        size_limit: info.size_limit,
        size,
        block_size,
        read_only: info.read_only(),
        partscan: info.partscan(),
        autoclear: info.autoclear(),
        direct_io: info.direct_io(),
        backing_file,
        diskseq,
        device: info.device,
        inode: info.inode,
    }))
}

/// Differences between what was asked and what the kernel applied (systemd's loop_configure_verify).
fn verify(got: &Applied, want: &Expected) -> Vec<String> {
    let mut diffs = Vec::new();
    if got.device != want.dev || got.inode != want.ino {
        diffs.push("the device is bound to another file".to_string());
    }
    let mut check = |what: &str, have: String, wanted: String| {
        if have != wanted {
            diffs.push(format!("{what} is {have}, expected {wanted}"));
        }
    };
    check("offset", got.offset.to_string(), want.opts.offset.to_string());
    check("size limit", got.size_limit.to_string(), want.opts.size_limit.to_string());
    check("size", got.size.to_string(), want.size.to_string());
    if want.opts.block_size != 0 {
        check("block size", got.block_size.to_string(), want.opts.block_size.to_string());
    }
    check("read-only", got.read_only.to_string(), want.opts.read_only.to_string());
    if want.opts.partscan {
        check("partscan", got.partscan.to_string(), true.to_string());
    }
    check("autoclear", got.autoclear.to_string(), want.opts.autoclear.to_string());
    diffs
}

/// Gives back a device this call bound: LOOP_CLR_FD, but only while it is still bound to `backing`
/// (`clear_fd_wait` checks first), and waits until the kernel reports it unbound. The caller then closes it.
fn release(lo: &Loop, backing: BorrowedFd) -> Result<()> {
    lo.clear_fd_wait(backing, RELEASE_TIMEOUT, RELEASE_POLL)
}

fn status_flags(fd: BorrowedFd) -> Result<OFlag> {
    fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).map(OFlag::from_bits_truncate).map_err(|e| Error::os(e, "fcntl"))
}

fn has_odirect(fd: BorrowedFd) -> Result<bool> {
    Ok(status_flags(fd)?.contains(OFlag::O_DIRECT))
}

/// F_SETFL without O_DIRECT (the other status flags kept).
fn clear_odirect(fd: BorrowedFd) -> Result<()> {
    let flags = status_flags(fd)? & !OFlag::O_DIRECT;
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags)).map(drop).map_err(|e| Error::os(e, "fcntl"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{File, OpenOptions};
    use std::os::unix::fs::OpenOptionsExt;
    use std::path::PathBuf;

    const MIB: u64 = 1 << 20;

    /// A sparse file of `size` bytes in a directory of its own, removed on drop.
    struct Image {
        dir: PathBuf,
        path: PathBuf,
    }

    impl Image {
        fn new(tag: &str, size: u64) -> Image {
            let dir = std::env::temp_dir().join(format!("loopdev-attach-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("disk.img");
            File::create(&path).unwrap().set_len(size).unwrap();
            Image { dir, path }
        }
        fn open(&self, flags: i32) -> File {
            OpenOptions::new().read(true).write(true).custom_flags(flags).open(&self.path).unwrap()
        }
        fn options(&self, configure: ConfigureOptions) -> AttachOptions {
            let file_name = Some(self.path.to_string_lossy().into_owned());
            AttachOptions { configure: ConfigureOptions { file_name, ..configure }, lock: false, owns_fd: true }
        }
    }

    impl Drop for Image {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn sysfs(lo: &Loop, attr: &str) -> String {
        std::fs::read_to_string(format!("/sys/block/{}/{attr}", lo.devname())).unwrap().trim_end().to_string()
    }

    /// Devices bound to `path` now, by sysfs.
    fn bound_to(path: &Path) -> Vec<String> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir("/sys/block").unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            let backing = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"));
            if name.starts_with("loop") && backing.map_or(false, |b| b.trim_end() == path.to_string_lossy()) {
                names.push(name);
            }
        }
        names
    }

    #[test]
    fn a_device_that_does_not_verify_is_released_and_another_tried() {
        let img = Image::new("retry", 4 * MIB);
        let file = img.open(0);
        let ctl = LoopControl::open(None).unwrap();
        let opts = img.options(ConfigureOptions { autoclear: true, ..Default::default() });
        let mut calls = 0;
        let attached = ctl
            .attach_verified_by(file.as_fd(), &opts, |got, want| {
                calls += 1;
                let mut diffs = verify(got, want);
                if calls == 1 {
                    diffs.push("made up".to_string());
                }
                diffs
            })
            .unwrap();
        let bound = bound_to(&img.path);
        detach(attached, &file);
        assert_eq!(calls, 2);
        assert_eq!(bound.len(), 1, "the first device was released: {bound:?}");
        assert!(bound_to(&img.path).is_empty());
    }

    #[test]
    fn after_the_last_attempt_the_differences_are_the_error_and_nothing_stays_bound() {
        let img = Image::new("mismatch", 4 * MIB);
        let file = img.open(0);
        let ctl = LoopControl::open(None).unwrap();
        let opts = img.options(ConfigureOptions::default());
        let mut calls = 0;
        let err = ctl
            .attach_verified_by(file.as_fd(), &opts, |_, _| {
                calls += 1;
                vec!["offset is 1, expected 0".to_string(), "size is 0, expected 4194304".to_string()]
            })
            .unwrap_err();
        assert!(bound_to(&img.path).is_empty(), "every device tried was released");
        assert_eq!(calls, VERIFY_ATTEMPTS);
        assert_eq!(err.code(), "ERR_LOOP_CONFIG_MISMATCH");
        assert_eq!(
            err.kind,
            Kind::ConfigMismatch {
                differences: vec!["offset is 1, expected 0".into(), "size is 0, expected 4194304".into()]
            }
        );
        assert_eq!(err.path.as_deref(), Some(img.path.as_path()));
        assert_eq!(
            err.to_string(),
            format!(
                "ERR_LOOP_CONFIG_MISMATCH: the kernel did not apply the requested configuration (offset is 1, \
                 expected 0; size is 0, expected 4194304) after 2 attempts, ioctl LOOP_CONFIGURE '{}'",
                img.path.display()
            )
        );
    }

    /// Detaches what the test bound (verified), so no test leaves a device behind.
    fn detach(attached: Attached, backing: &File) {
        attached.lo.clear_fd_wait(backing.as_fd(), Duration::from_secs(10), RELEASE_POLL).unwrap();
    }

    #[test]
    fn binds_and_reports_what_the_kernel_applied() {
        let img = Image::new("plain", 8 * MIB);
        let file = img.open(0);
        let ctl = LoopControl::open(None).unwrap();
        let opts = img.options(ConfigureOptions {
            offset: MIB,
            size_limit: 4 * MIB,
            block_size: 4096,
            autoclear: true,
            ..Default::default()
        });
        let attached = ctl.attach(file.as_fd(), &opts).unwrap();
        let a = &attached.applied;
        let st = nix::sys::stat::fstat(file.as_raw_fd()).unwrap();
        assert_eq!((a.device, a.inode), (st.st_dev, st.st_ino));
        assert_eq!((a.offset, a.size_limit, a.size, a.block_size), (MIB, 4 * MIB, 4 * MIB, 4096));
        assert!(a.autoclear && !a.read_only && !a.partscan && !a.direct_io);
        assert_eq!(a.backing_file, img.path.to_string_lossy());
        assert_eq!(sysfs(&attached.lo, "size"), (4 * MIB / 512).to_string());
        assert_eq!(sysfs(&attached.lo, "queue/logical_block_size"), "4096");
        assert_eq!(sysfs(&attached.lo, "loop/autoclear"), "1");
        assert_eq!(
            a.diskseq.map(|s| s.to_string()),
            std::fs::read_to_string(format!("/sys/block/{}/diskseq", attached.lo.devname()))
                .ok()
                .map(|s| s.trim().to_string())
        );
        detach(attached, &file);
    }

    #[test]
    fn size_is_what_is_left_after_the_offset_rounded_down_to_a_sector() {
        let img = Image::new("round", 4 * MIB + 700);
        let file = img.open(0);
        let ctl = LoopControl::open(None).unwrap();
        let opts = img.options(ConfigureOptions { offset: 100, read_only: false, ..Default::default() });
        let attached = ctl.attach(file.as_fd(), &opts).unwrap();
        assert_eq!(attached.applied.size, (4 * MIB + 600) / 512 * 512);
        assert_eq!(attached.applied.offset, 100);
        detach(attached, &file);
    }

    #[test]
    fn a_read_only_fd_binds_read_only() {
        let img = Image::new("ro", 4 * MIB);
        let file = File::open(&img.path).unwrap();
        let ctl = LoopControl::open(None).unwrap();
        let opts = img.options(ConfigureOptions { read_only: true, ..Default::default() });
        let attached = ctl.attach(file.as_fd(), &opts).unwrap();
        assert!(attached.applied.read_only);
        assert_eq!(sysfs(&attached.lo, "ro"), "1");
        detach(attached, &file);
    }

    /// Direct I/O with 512-byte sectors on a 4096-byte-sector backing device: the kernel refuses it, so the
    /// device is bound again buffered and O_DIRECT is cleared on the (owned) fd.
    #[test]
    fn refused_direct_io_on_an_o_direct_fd_rebinds_buffered() {
        let img = Image::new("dio", 8 * MIB);
        let file = img.open(0);
        let ctl = LoopControl::open(None).unwrap();
        let lower_opts = img.options(ConfigureOptions { block_size: 4096, autoclear: true, ..Default::default() });
        let lower = ctl.attach(file.as_fd(), &lower_opts).unwrap();
        let upper_path = lower.lo.path().to_path_buf();
        let upper_file =
            OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(&upper_path).unwrap();
        let opts = AttachOptions {
            configure: ConfigureOptions {
                block_size: 512,
                direct_io: true,
                autoclear: true,
                file_name: Some(upper_path.to_string_lossy().into_owned()),
                ..Default::default()
            },
            lock: false,
            owns_fd: true,
        };
        let upper = ctl.attach(upper_file.as_fd(), &opts);
        let outcome =
            upper.as_ref().map_err(Error::clone).map(|u| (u.applied.direct_io, u.applied.block_size, u.applied.size));
        let odirect = has_odirect(upper_file.as_fd()).unwrap();
        if let Ok(upper) = upper {
            detach(upper, &upper_file);
        }
        drop(upper_file); // an opener of the lower device: its detach would wait for it
        detach(lower, &file);
        assert_eq!(outcome.unwrap(), (false, 512, 8 * MIB));
        assert!(!odirect, "O_DIRECT cleared on the fd");
    }

    #[test]
    fn a_callers_o_direct_fd_is_left_as_it_is() {
        let img = Image::new("dio-caller", 4 * MIB);
        let file = img.open(libc::O_DIRECT);
        let ctl = LoopControl::open(None).unwrap();
        let opts =
            AttachOptions { owns_fd: false, ..img.options(ConfigureOptions { direct_io: true, ..Default::default() }) };
        let attached = ctl.attach(file.as_fd(), &opts).unwrap();
        assert!(has_odirect(file.as_fd()).unwrap());
        detach(attached, &file);
    }

    #[test]
    fn what_cannot_be_mapped_is_refused_before_any_device_is_touched() {
        let ctl = LoopControl::open(None).unwrap();
        for (size, offset, needle) in [
            (0, 0, "backing file is empty"),
            (4 * MIB, 4 * MIB, "at or beyond the end"),
            (4 * MIB, 4 * MIB - 100, "less than one 512-byte sector"),
        ] {
            let img = Image::new("refused", size);
            let file = img.open(0);
            let err =
                ctl.attach(file.as_fd(), &img.options(ConfigureOptions { offset, ..Default::default() })).unwrap_err();
            assert_eq!((err.code(), err.syscall), ("EINVAL".to_string(), "fstat"));
            assert_eq!(err.path.as_deref(), Some(img.path.as_path()));
            assert!(err.to_string().contains(needle), "{err}");
        }
        let dir = File::open(std::env::temp_dir()).unwrap();
        assert_eq!(ctl.attach(dir.as_fd(), &AttachOptions::default()).unwrap_err().code(), "EINVAL");
    }

    #[test]
    fn verify_lists_every_difference() {
        let opts = ConfigureOptions {
            offset: 512,
            size_limit: 0,
            block_size: 4096,
            autoclear: true,
            partscan: true,
            read_only: true,
            ..Default::default()
        };
        let want = Expected { dev: 1, ino: 2, size: 1024, opts: &opts };
        let got = Applied {
            offset: 512,
            size_limit: 0,
            size: 1024,
            block_size: 4096,
            read_only: true,
            partscan: true,
            autoclear: true,
            direct_io: false,
            backing_file: String::new(),
            diskseq: None,
            device: 1,
            inode: 2,
        };
        assert!(verify(&got, &want).is_empty());
        let bad = Applied {
            inode: 3,
            offset: 0,
            size: 512,
            block_size: 512,
            read_only: false,
            partscan: false,
            autoclear: false,
            ..got
        };
        assert_eq!(
            verify(&bad, &want),
            [
                "the device is bound to another file",
                "offset is 0, expected 512",
                "size is 512, expected 1024",
                "block size is 512, expected 4096",
                "read-only is false, expected true",
                "partscan is false, expected true",
                "autoclear is false, expected true",
            ]
        );
        // Sector size and partscan are checked only when asked for.
        let loose = ConfigureOptions { block_size: 0, partscan: false, ..opts.clone() };
        let want = Expected { opts: &loose, ..want };
        assert!(verify(&Applied { block_size: 512, partscan: false, ..bad.clone() }, &want).len() == 5);
    }

    #[test]
    fn a_mismatch_is_its_own_kind_and_code() {
        let e = Error {
            kind: Kind::ConfigMismatch { differences: vec!["x".into()] },
            ..Error::ioctl(Errno::EIO, "LOOP_CONFIGURE")
        };
        assert_eq!(e.code(), "ERR_LOOP_CONFIG_MISMATCH");
    }
}
