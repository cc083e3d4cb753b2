//! What the server accepts from a peer. The server runs as root for peers that are not: every fd a peer
//! sends is checked for what the *peer* could do with it, so that the server never lends the peer its own
//! rights (reading a file through a write-only fd, writing an append-only log, creating files in a directory
//! the peer cannot write).

use super::seqpacket;
use super::wire::WireError;
use crate::device::check_backing;
use crate::error::Error;
use crate::inode::stat_fd;
use crate::ioctl;
use crate::uapi;
use nix::errno::Errno;
use nix::fcntl::OFlag;
use std::os::unix::io::BorrowedFd;

/// How the backing file may be bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backing {
    /// The peer opened it O_RDWR: a writable device is allowed. Otherwise the device is bound read-only.
    pub writable: bool,
}

fn os(e: Error) -> WireError {
    WireError::new(e.errno, e.to_string())
}

/// The backing file: a regular file or block device the peer opened for reading (a device reads the file,
/// whatever the fd's mode), not O_APPEND, and writable only where the inode allows writes in place.
pub fn backing(fd: BorrowedFd) -> Result<Backing, WireError> {
    let flags = seqpacket::status_flags(fd).map_err(os)?;
    if flags.contains(OFlag::O_PATH) {
        return Err(WireError::new(Errno::EBADF, "an O_PATH file descriptor cannot be used"));
    }
    // fstat itself never fails with EINVAL: that is the kind check.
    check_backing(fd).map_err(|e| match e.errno {
        Errno::EINVAL => WireError::invalid("the backing file ('fd') is not a regular file or block device"),
        _ => os(e),
    })?;
    let writable = match flags.bits() & libc::O_ACCMODE {
        libc::O_RDONLY => false,
        libc::O_RDWR => true,
        _ => return Err(WireError::new(Errno::EBADF, "the backing file ('fd') must be open for reading")),
    };
    if flags.contains(OFlag::O_APPEND) {
        return Err(WireError::new(Errno::EPERM, "the backing file ('fd') is open O_APPEND: a device writes in place"));
    }
    if writable {
        // ENOTTY/EINVAL: the filesystem keeps no such attributes.
        let attrs = ioctl::fs_flags(fd).unwrap_or(0);
        if attrs & (uapi::FS_APPEND_FL | uapi::FS_IMMUTABLE_FL) != 0 {
            return Err(WireError::new(
                Errno::EPERM,
                "the backing file is append-only or immutable: only a read-only device (O_RDONLY fd) is allowed",
            ));
        }
    }
    Ok(Backing { writable })
}

/// The directory the node goes into: a directory, and for a non-root peer one it owns. Root could write
/// anywhere; anyone else must not get a node into /etc/cron.d through a directory fd it could merely open.
pub fn node_dir(fd: BorrowedFd, peer_uid: u32) -> Result<(), WireError> {
    // O_PATH directories are fine: osbuild's client opens "/dev" with O_DIRECTORY, but *at() calls need no more.
    let st = stat_fd(fd).map_err(os)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        return Err(WireError::new(Errno::ENOTDIR, "'dir_fd' is not a directory"));
    }
    if peer_uid != 0 && st.st_uid != peer_uid {
        return Err(WireError::new(
            Errno::EACCES,
            format!("'dir_fd' must be a directory owned by uid {peer_uid} (it is owned by uid {})", st.st_uid),
        ));
    }
    Ok(())
}
