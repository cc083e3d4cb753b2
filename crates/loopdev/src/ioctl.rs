//! One safe function per loop(4) ioctl, built on nix's "bad" ioctl macros (the loop ioctls have fixed
//! numbers rather than `_IOW`-encoded ones). Each returns the bare errno; callers add path and context.

use crate::uapi::{self, BlkpgIoctlArg, BlkpgPartition, LoopConfig, LoopInfo64};
use nix::errno::Errno;
use std::os::raw::{c_int, c_long, c_ulong};
use std::os::unix::io::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// nix's `ioctl_write_int_bad!` passes a C `int` through the variadic `ioctl()`, but the kernel reads the
/// argument as `unsigned long`: the upper half of the register is whatever the caller left there (the ABI
/// does not define it). Pass a full `unsigned long`, as systemd and util-linux do.
macro_rules! ioctl_write_ulong_bad {
    ($name:ident, $nr:expr) => {
        /// # Safety
        /// `fd` must be open, and `$nr` an ioctl that takes its argument by value, not as a pointer.
        pub unsafe fn $name(fd: c_int, data: c_ulong) -> nix::Result<c_int> {
            Errno::result(libc::ioctl(fd, $nr as nix::sys::ioctl::ioctl_num_type, data))
        }
    };
}

mod raw {
    use super::*;
    ioctl_write_ulong_bad!(loop_set_fd, uapi::LOOP_SET_FD);
    nix::ioctl_none_bad!(loop_clr_fd, uapi::LOOP_CLR_FD);
    nix::ioctl_write_ptr_bad!(loop_set_status64, uapi::LOOP_SET_STATUS64, LoopInfo64);
    nix::ioctl_read_bad!(loop_get_status64, uapi::LOOP_GET_STATUS64, LoopInfo64);
    ioctl_write_ulong_bad!(loop_change_fd, uapi::LOOP_CHANGE_FD);
    nix::ioctl_none_bad!(loop_set_capacity, uapi::LOOP_SET_CAPACITY);
    ioctl_write_ulong_bad!(loop_set_direct_io, uapi::LOOP_SET_DIRECT_IO);
    ioctl_write_ulong_bad!(loop_set_block_size, uapi::LOOP_SET_BLOCK_SIZE);
    nix::ioctl_write_ptr_bad!(loop_configure, uapi::LOOP_CONFIGURE, LoopConfig);
    ioctl_write_ulong_bad!(loop_ctl_add, uapi::LOOP_CTL_ADD);
    ioctl_write_ulong_bad!(loop_ctl_remove, uapi::LOOP_CTL_REMOVE);
    nix::ioctl_none_bad!(loop_ctl_get_free, uapi::LOOP_CTL_GET_FREE);
    nix::ioctl_none_bad!(blkflsbuf, uapi::BLKFLSBUF);
    nix::ioctl_read_bad!(blksszget, uapi::BLKSSZGET, c_int);
    nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
    nix::ioctl_write_ptr_bad!(blkpg, uapi::BLKPG, BlkpgIoctlArg);
    // FS_IOC_GETFLAGS is declared `_IOR('f', 1, long)` but the kernel reads and writes an int.
    nix::ioctl_read_bad!(fs_ioc_getflags, nix::request_code_read!(b'f', 1, std::mem::size_of::<libc::c_long>()), c_int);
}

pub type Result<T> = std::result::Result<T, Errno>;

/// A C `int` as the `unsigned long` the kernel reads: sign-extended, as C converts `(unsigned long)(int)`, so
/// that -1 ("any minor") arrives as the kernel's `(int)` cast expects on every ABI.
fn int_arg(v: c_int) -> c_ulong {
    c_long::from(v) as c_ulong
}

fn fd_arg(fd: BorrowedFd) -> c_ulong {
    int_arg(fd.as_raw_fd())
}

/// LOOP_SET_FD: bind `backing` to the loop device.
pub fn set_fd(lo: BorrowedFd, backing: BorrowedFd) -> Result<()> {
    // SAFETY: both fds are valid for the borrow; the ioctl takes the backing fd by value.
    unsafe { raw::loop_set_fd(lo.as_raw_fd(), fd_arg(backing)) }.map(drop)
}

/// LOOP_CLR_FD: unbind (deferred by the kernel to the last close when others hold the device open).
pub fn clr_fd(lo: BorrowedFd) -> Result<()> {
    // SAFETY: the fd is valid for the borrow; the ioctl takes no argument.
    unsafe { raw::loop_clr_fd(lo.as_raw_fd()) }.map(drop)
}

/// LOOP_SET_STATUS64.
pub fn set_status64(lo: BorrowedFd, info: &LoopInfo64) -> Result<()> {
    // SAFETY: `info` is a valid, initialised loop_info64 that the kernel only reads.
    unsafe { raw::loop_set_status64(lo.as_raw_fd(), info) }.map(drop)
}

/// LOOP_GET_STATUS64; ENXIO when the device is unbound.
pub fn get_status64(lo: BorrowedFd) -> Result<LoopInfo64> {
    let mut info = LoopInfo64::default();
    // SAFETY: `info` is a writable loop_info64 of the size the kernel writes.
    unsafe { raw::loop_get_status64(lo.as_raw_fd(), &mut info) }?;
    Ok(info)
}

/// LOOP_CHANGE_FD: swap the backing file of a read-only device for one of the same size.
pub fn change_fd(lo: BorrowedFd, backing: BorrowedFd) -> Result<()> {
    // SAFETY: both fds are valid for the borrow.
    unsafe { raw::loop_change_fd(lo.as_raw_fd(), fd_arg(backing)) }.map(drop)
}

/// LOOP_SET_CAPACITY: re-read the backing file's size.
pub fn set_capacity(lo: BorrowedFd) -> Result<()> {
    // SAFETY: the fd is valid for the borrow; no argument.
    unsafe { raw::loop_set_capacity(lo.as_raw_fd()) }.map(drop)
}

/// LOOP_SET_DIRECT_IO.
pub fn set_direct_io(lo: BorrowedFd, on: bool) -> Result<()> {
    // SAFETY: the fd is valid for the borrow; the argument is a plain integer.
    unsafe { raw::loop_set_direct_io(lo.as_raw_fd(), c_ulong::from(on)) }.map(drop)
}

/// LOOP_SET_BLOCK_SIZE: logical sector size, a power of two from 512 to the page size.
pub fn set_block_size(lo: BorrowedFd, size: u32) -> Result<()> {
    // SAFETY: the fd is valid for the borrow; the argument is a plain integer.
    unsafe { raw::loop_set_block_size(lo.as_raw_fd(), c_ulong::from(size)) }.map(drop)
}

/// LOOP_CONFIGURE (Linux ≥ 5.8): bind and set status atomically.
pub fn configure(lo: BorrowedFd, config: &LoopConfig) -> Result<()> {
    // SAFETY: `config` is a valid, initialised loop_config that the kernel only reads.
    unsafe { raw::loop_configure(lo.as_raw_fd(), config) }.map(drop)
}

/// LOOP_CTL_ADD: create loop device `minor`, or the first free minor when negative; returns the minor.
pub fn ctl_add(control: BorrowedFd, minor: i32) -> Result<u32> {
    // SAFETY: the fd is valid for the borrow; the argument is a plain integer.
    unsafe { raw::loop_ctl_add(control.as_raw_fd(), int_arg(minor)) }.map(|m| m as u32)
}

/// LOOP_CTL_REMOVE: delete loop device `minor` (EBUSY while bound or open).
pub fn ctl_remove(control: BorrowedFd, minor: i32) -> Result<()> {
    // SAFETY: the fd is valid for the borrow; the argument is a plain integer.
    unsafe { raw::loop_ctl_remove(control.as_raw_fd(), int_arg(minor)) }.map(drop)
}

/// LOOP_CTL_GET_FREE: the minor of an unbound device, created if needed.
pub fn ctl_get_free(control: BorrowedFd) -> Result<u32> {
    // SAFETY: the fd is valid for the borrow; no argument.
    unsafe { raw::loop_ctl_get_free(control.as_raw_fd()) }.map(|m| m as u32)
}

/// BLKFLSBUF: flush the device's buffer cache.
pub fn flush_buf(dev: BorrowedFd) -> Result<()> {
    // SAFETY: the fd is valid for the borrow; no argument.
    unsafe { raw::blkflsbuf(dev.as_raw_fd()) }.map(drop)
}

/// BLKSSZGET: the logical sector size of a block device.
pub fn blk_sector_size(dev: BorrowedFd) -> Result<u32> {
    let mut size: c_int = 0;
    // SAFETY: `size` is a writable int, what the kernel writes for this ioctl.
    unsafe { raw::blksszget(dev.as_raw_fd(), &mut size) }?;
    Ok(size as u32)
}

/// BLKGETSIZE64: the size of a block device in bytes.
pub fn blk_size(dev: BorrowedFd) -> Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: `size` is a writable u64, what the kernel writes for this ioctl.
    unsafe { raw::blkgetsize64(dev.as_raw_fd(), &mut size) }?;
    Ok(size)
}

fn blkpg(dev: BorrowedFd, op: i32, part: &BlkpgPartition) -> Result<()> {
    let mut part = *part;
    let arg = BlkpgIoctlArg { op, flags: 0, datalen: std::mem::size_of::<BlkpgPartition>() as i32, data: &mut part };
    // SAFETY: `arg` points at a valid blkpg_partition of `datalen` bytes, alive for the call.
    unsafe { raw::blkpg(dev.as_raw_fd(), &arg) }.map(drop)
}

/// BLKPG_ADD_PARTITION: partition `number` of the disk at `start` for `length` bytes (what `partx -a`
/// does). EBUSY when the number is taken or the range overlaps an existing partition.
pub fn blkpg_add_partition(dev: BorrowedFd, number: u32, start: u64, length: u64) -> Result<()> {
    let part = BlkpgPartition {
        start: i64::try_from(start).map_err(|_| Errno::EOVERFLOW)?,
        length: i64::try_from(length).map_err(|_| Errno::EOVERFLOW)?,
        pno: i32::try_from(number).map_err(|_| Errno::EINVAL)?,
        devname: [0; uapi::BLKPG_DEVNAMELTH],
        volname: [0; uapi::BLKPG_VOLNAMELTH],
    };
    blkpg(dev, uapi::BLKPG_ADD_PARTITION, &part)
}

/// BLKPG_DEL_PARTITION: remove partition `number` (EBUSY while it is open, ENXIO when there is none).
pub fn blkpg_del_partition(dev: BorrowedFd, number: u32) -> Result<()> {
    let part = BlkpgPartition {
        start: 0,
        length: 0,
        pno: i32::try_from(number).map_err(|_| Errno::EINVAL)?,
        devname: [0; uapi::BLKPG_DEVNAMELTH],
        volname: [0; uapi::BLKPG_VOLNAMELTH],
    };
    blkpg(dev, uapi::BLKPG_DEL_PARTITION, &part)
}

/// FS_IOC_GETFLAGS: the inode's `FS_*_FL` attributes (`chattr`); ENOTTY where the filesystem has none.
pub fn fs_flags(file: BorrowedFd) -> Result<u32> {
    let mut flags: c_int = 0;
    // SAFETY: `flags` is a writable int, the size the kernel writes for this ioctl.
    unsafe { raw::fs_ioc_getflags(file.as_raw_fd(), &mut flags) }?;
    Ok(flags as u32)
}

/// flock(2) on any fd (loop device or loop-control). A blocking flock is interrupted by any signal whose
/// handler lacks SA_RESTART (EINTR); the caller asked to wait for the lock, so the wait goes on.
pub fn flock(fd: BorrowedFd, op: c_int) -> Result<()> {
    loop {
        // SAFETY: plain syscall on a borrowed, valid fd.
        match Errno::result(unsafe { libc::flock(fd.as_raw_fd(), op) }) {
            Err(Errno::EINTR) => continue,
            other => return other.map(drop),
        }
    }
}

/// open_tree(fd, "", OPEN_TREE_CLONE | AT_EMPTY_PATH | OPEN_TREE_CLOEXEC): a detached bind mount of the file
/// behind `fd`, as an fd (Linux ≥ 5.2; ENOSYS before).
pub fn open_tree_clone(fd: BorrowedFd) -> Result<OwnedFd> {
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    let flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_EMPTY_PATH as libc::c_uint;
    // SAFETY: plain syscall on a borrowed, valid fd with a NUL-terminated empty path.
    let raw = unsafe { libc::syscall(libc::SYS_open_tree, fd.as_raw_fd(), b"\0".as_ptr(), flags) };
    // SAFETY: on success the kernel returned a new fd that nothing else owns.
    Errno::result(raw).map(|fd| unsafe { OwnedFd::from_raw_fd(fd as c_int) })
}

/// move_mount(tree, "", target, "", MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH): attach the mount
/// `tree` on top of the file behind `target`, both by fd.
pub fn move_mount_onto(tree: BorrowedFd, target: BorrowedFd) -> Result<()> {
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x04;
    const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;
    let empty = b"\0".as_ptr();
    let flags = MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH;
    // SAFETY: plain syscall on two borrowed, valid fds with NUL-terminated empty paths.
    Errno::result(unsafe {
        libc::syscall(libc::SYS_move_mount, tree.as_raw_fd(), empty, target.as_raw_fd(), empty, flags)
    })
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::io::AsFd;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn integer_arguments_are_unsigned_long_like_the_kernel_reads_them() {
        // Compile-time: a C int here would again leave the upper half of the register to chance.
        type IntIoctl = unsafe fn(c_int, c_ulong) -> nix::Result<c_int>;
        let fns: [IntIoctl; 6] = [
            raw::loop_set_fd,
            raw::loop_change_fd,
            raw::loop_set_direct_io,
            raw::loop_set_block_size,
            raw::loop_ctl_add,
            raw::loop_ctl_remove,
        ];
        assert_eq!(fns.len(), 6);
        // -1 must reach `loop_add((int)arg)` as -1: sign-extended, never 0x00000000ffffffff by accident.
        assert_eq!(int_arg(-1), c_ulong::MAX);
        assert_eq!(int_arg(7), 7);
    }

    extern "C" fn ignore(_: c_int) {}

    #[test]
    fn a_blocking_flock_survives_a_signal_without_sa_restart() {
        // A handler without SA_RESTART makes the kernel fail a blocked flock with EINTR.
        // SAFETY: installs a handler that does nothing; SIGURG is otherwise unused by the test process.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = ignore as *const () as usize;
            sa.sa_flags = 0;
            assert_eq!(libc::sigaction(libc::SIGURG, &sa, std::ptr::null_mut()), 0);
        }
        let path = std::env::temp_dir().join(format!("loopdev-flock-eintr-{}", std::process::id()));
        let holder = std::fs::File::create(&path).unwrap();
        let waiter = std::fs::File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        flock(holder.as_fd(), libc::LOCK_EX).unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let thread = {
            let done = done.clone();
            std::thread::spawn(move || {
                // SAFETY: pthread_self has no preconditions.
                tid_tx.send(unsafe { libc::pthread_self() }).unwrap();
                let r = flock(waiter.as_fd(), libc::LOCK_EX);
                done.store(true, Ordering::SeqCst);
                r
            })
        };
        let tid = tid_rx.recv().unwrap();
        for _ in 0..5 {
            std::thread::sleep(Duration::from_millis(40));
            // SAFETY: the thread is alive until joined below (it is blocked in flock).
            unsafe { libc::pthread_kill(tid, libc::SIGURG) };
        }
        assert!(!done.load(Ordering::SeqCst), "the waiter must still be waiting for the lock");
        flock(holder.as_fd(), libc::LOCK_UN).unwrap();
        assert_eq!(thread.join().unwrap(), Ok(()));
    }
}
