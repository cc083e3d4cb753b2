//! Device nodes for a loop device in a directory that may belong to someone else (a container's /dev, the
//! remote server's peers). No name in that directory is trusted to mean the same thing twice: what we create
//! we hold by fd, what we undo we find by fd, and an entry that is not what we made is left alone.

use crate::error::{Error, Kind, Result};
use crate::inode::{dir_path, is_kind, mount_id, open_in, stat_fd};
use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::stat::{self, mknodat, FileStat, Mode, SFlag};
use nix::unistd::{unlinkat, UnlinkatFlags};
use std::os::unix::io::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

/// A node `Loop::mknod` made: enough to undo exactly that, wherever the directory's owner moved it since.
#[derive(Debug)]
pub struct Node {
    name: String,
    rdev: u64,
    /// The bind mount we attached (an `open_tree` fd), when the node is one.
    mount: Option<OwnedFd>,
    /// The empty file the bind mount sits on (st_dev, st_ino), when there is one in a directory whose owner
    /// may swap names (not in a peer's holder, where only we make entries).
    placeholder: Option<(u64, u64)>,
    /// For a peer: root's directory in the peer's, which the node is in (see `make_for_peer`).
    holder: Option<Holder>,
}

/// Root's directory `<name>.d` in a peer's directory, held by fd: the peer may rename it, but only within
/// its directory, and cannot touch what is in it.
#[derive(Debug)]
struct Holder {
    name: String,
    fd: OwnedFd,
}

impl Node {
    /// Where the node is, relative to the directory it was made in: `loopN`, or `loopN.d/loopN` for a peer.
    pub fn name(&self) -> String {
        match &self.holder {
            Some(h) => format!("{}/{}", h.name, self.name),
            None => self.name.clone(),
        }
    }

    /// Undoes the node in `dir`: detaches *our* mount (found by its fd, not by name), then unlinks the entry
    /// only if it still is our placeholder or a node of our device. A name the owner swapped is left alone;
    /// so is a peer's holder directory it renamed (emptied: the peer may remove it).
    pub fn remove(mut self, dir: BorrowedFd) -> Result<()> {
        self.detach();
        let ours = |e: &FileStat| {
            (is_kind(e, SFlag::S_IFBLK) && e.st_rdev == self.rdev) || self.placeholder == Some((e.st_dev, e.st_ino))
        };
        match &self.holder {
            None => unlink_if(dir, &self.name, ours).map_err(|e| e.with_path(&dir_path(Some(dir)).join(&self.name))),
            Some(h) => {
                // In root's directory no one else makes or renames entries: the name is our placeholder. No
                // stat first: a stat by name would cross a mount the peer put on it in its own namespace.
                let unlinked = unlinkat(Some(h.fd.as_raw_fd()), self.name.as_str(), UnlinkatFlags::NoRemoveDir);
                let holder = remove_holder(dir, h);
                match unlinked {
                    Ok(()) | Err(Errno::ENOENT) => holder,
                    Err(e) => Err(Error::os(e, "unlink").with_path(&dir_path(Some(h.fd.as_fd())).join(&self.name))),
                }
            }
        }
    }

    /// Detaches *our* mount, through its fd: the directory it sits in is never looked at, so this cannot
    /// wait on a filesystem that stopped answering (a FUSE daemon). The placeholder stays until `remove`.
    pub fn detach(&mut self) {
        if let Some(m) = self.mount.take() {
            let _ = umount2(&fd_path(m.as_fd()), MntFlags::MNT_DETACH);
        }
    }
}

/// The magic link that names exactly the file behind `fd`; resolving it never looks at a name again.
fn fd_path(fd: BorrowedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// `dir/name` for a loop device: bind-mount the device (held open as `device`) onto an empty file made with
/// O_EXCL|O_NOFOLLOW, through fds only; where no bind mount is possible (another mount namespace, no
/// privilege), mknod a block device 7:minor instead. For root's own use (a container's /dev); a peer's
/// directory gets `make_for_peer`.
pub(crate) fn make(dir: BorrowedFd, name: &str, device: BorrowedFd, rdev: u64, mode: u32) -> Result<Node> {
    let perm = Mode::from_bits_truncate(mode & 0o7777);
    let (placeholder, st) = create_placeholder(dir, name, perm)?;
    if let Ok(mount) = bind(device, placeholder.as_fd()) {
        let placeholder = Some((st.st_dev, st.st_ino));
        return Ok(Node { name: name.to_string(), rdev, mount, placeholder, holder: None });
    }
    let path = || dir_path(Some(dir)).join(name);
    unlink_if(dir, name, |e| (e.st_dev, e.st_ino) == (st.st_dev, st.st_ino)).map_err(|e| e.with_path(&path()))?;
    mknodat(dir.as_raw_fd(), name, SFlag::S_IFBLK, perm, rdev).map_err(|e| Error::os(e, "mknod").with_path(&path()))?;
    Ok(Node { name: name.to_string(), rdev, mount: None, placeholder: None, holder: None })
}

/// `dir/<name>.d/<name>` for a peer (a uid that owns `dir` and is not root): the host's node (root's, 0600)
/// bind-mounted onto an empty file in a directory of root's (0755) made for it in `dir`.
///
/// Not `dir/<name>`: the peer can rename any entry of its own directory to any place on that filesystem,
/// and from a mount namespace of its own, where our mount is no mount point, the kernel lets it, and our
/// mount moves with the name (red team round 22: to `/tmp/x.conf`, where root then wrote into the peer's
/// file, past `protected_regular`). An entry of root's directory it cannot rename, and root's directory it
/// can rename only within its own (moving a directory to another needs write permission on it), so the
/// device stays below directories the peer owns, where every name is the peer's anyway.
///
/// The peer cannot open the node (the server hands root an fd instead, when asked), so nothing it keeps
/// (an O_PATH fd, a copy of the mount in its own namespace, a node left by a server that crashed) reaches
/// whatever file is bound to that minor next. A node owned by the peer would. And no mknod fallback: a
/// node could be hard-linked (a mount point cannot: EXDEV), and the link would outlive the device.
pub(crate) fn make_for_peer(dir: BorrowedFd, name: &str, device: BorrowedFd, rdev: u64) -> Result<Node> {
    let holder = make_holder(dir, &format!("{name}.d"))?;
    match bind_in(&holder, name, device) {
        Ok(mount) => Ok(Node { name: name.to_string(), rdev, mount, placeholder: None, holder: Some(holder) }),
        Err(e) => {
            let _ = remove_holder(dir, &holder);
            Err(e)
        }
    }
}

/// The device bind-mounted onto a new empty file `name` in the holder (the mount's fd); nothing is left
/// there when that fails.
fn bind_in(holder: &Holder, name: &str, device: BorrowedFd) -> Result<Option<OwnedFd>> {
    let (file, _) = create_placeholder(holder.fd.as_fd(), name, Mode::from_bits_truncate(0o600))?;
    bind(device, file.as_fd()).map_err(|e| {
        let _ = unlinkat(Some(holder.fd.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir);
        e.with_path(&dir_path(Some(holder.fd.as_fd())).join(name)).with_detail(
            "cannot bind-mount the device into this directory (is it in another mount namespace?); \
             a device node is only made for root",
        )
    })
}

/// An empty file `dir/name`, made with O_EXCL|O_NOFOLLOW (a name someone else put there is refused).
fn create_placeholder(dir: BorrowedFd, name: &str, perm: Mode) -> Result<(OwnedFd, FileStat)> {
    let file = OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_RDONLY | OFlag::O_CLOEXEC;
    let raw = openat(dir.as_raw_fd(), name, file, perm)
        .map_err(|e| Error::os(e, "open").with_path(&dir_path(Some(dir)).join(name)))?;
    // SAFETY: openat returned a fresh fd that nothing else owns.
    let placeholder = unsafe { OwnedFd::from_raw_fd(raw) };
    let st = stat_fd(placeholder.as_fd())?;
    Ok((placeholder, st))
}

/// Root's directory `dir/name` (0755: the calling thread's umask must leave it so; the server's workers
/// have their own, see `workers::own_umask`), held by fd. Opened O_NOFOLLOW and taken only if it is what
/// mkdir made — a directory, root's, 0755 (a setgid bit inherited from `dir` aside), empty, and on the same
/// mount as `dir`: between the mkdir and the open the peer may have put something else at the name: a
/// symlink (not followed), a directory of its own, an empty directory of root's from elsewhere in its
/// directory (round 24 slid one in while a chmod still followed the checks: nothing is changed on what is
/// found now), or, through a `dir` fd from a mount namespace of its own, a mount of anything (`/etc`) over
/// ours, which the open would cross (review of round 22's fix). Anything else is refused, and the name is
/// removed if it is an empty directory (ours, or one the peer could remove itself).
fn make_holder(dir: BorrowedFd, name: &str) -> Result<Holder> {
    let path = || dir_path(Some(dir)).join(name);
    let mode = Mode::from_bits_truncate(0o755);
    stat::mkdirat(dir.as_raw_fd(), name, mode).map_err(|e| Error::os(e, "mkdir").with_path(&path()))?;
    let opened = open_in(Some(dir), name, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW);
    match opened.and_then(|fd| claim_holder(dir, fd, mode)) {
        Ok(fd) => Ok(Holder { name: name.to_string(), fd }),
        Err(e) => {
            let _ = unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::RemoveDir);
            Err(e.with_path(&path()))
        }
    }
}

/// `fd` if it is the directory `make_holder` just made with `mode`.
fn claim_holder(dir: BorrowedFd, fd: OwnedFd, mode: Mode) -> Result<OwnedFd> {
    let st = stat_fd(fd.as_fd())?;
    let empty = || std::fs::read_dir(fd_path(fd.as_fd())).map_or(false, |mut entries| entries.next().is_none());
    let ours = is_kind(&st, SFlag::S_IFDIR)
        && st.st_uid == 0
        && st.st_mode & 0o777 == mode.bits()
        && mount_id(fd.as_fd())? == mount_id(dir)?
        && empty();
    if !ours {
        return Err(Error::os(Errno::EEXIST, "mkdir").with_detail(format!(
            "the name is not the empty directory of root's (0755) just made there, on the directory's own mount \
             (found: uid {}, mode {:o}; a filesystem that does not keep root's ownership, such as NFS with \
             root_squash, cannot hold a non-root peer's node, nor a directory whose default ACL narrows 0755)",
            st.st_uid,
            st.st_mode & 0o7777
        )));
    }
    Ok(fd)
}

/// Removes `loopN.d` from `dir` by name if an empty directory is there: ours, or, if the peer renamed ours
/// (it stays, emptied, for the peer to remove) and put one of its own at the name, that one, which it could
/// remove itself. No stat first: there is no rmdir by fd, so a check of the name could not hold until the
/// rmdir anyway (red team round 23 swapped names in between), and a stat would cross a mount the peer put
/// on the name in its own namespace, while the rmdir acts on the entry itself.
fn remove_holder(dir: BorrowedFd, holder: &Holder) -> Result<()> {
    match unlinkat(Some(dir.as_raw_fd()), holder.name.as_str(), UnlinkatFlags::RemoveDir) {
        Ok(()) => Ok(()),
        Err(Errno::ENOTEMPTY | Errno::ENOENT | Errno::ENOTDIR | Errno::EBUSY) => Ok(()),
        Err(e) => Err(Error::os(e, "rmdir").with_path(&dir_path(Some(dir)).join(&holder.name))),
    }
}

/// Bind-mounts `source` onto `target`, both by fd. With open_tree + move_mount (Linux ≥ 5.2) the mount is
/// returned as an fd, so it can be detached later wherever it has been moved; older kernels get a bind mount
/// through the fds' magic links, which cannot be followed after a rename.
fn bind(source: BorrowedFd, target: BorrowedFd) -> Result<Option<OwnedFd>> {
    match crate::ioctl::open_tree_clone(source) {
        Ok(tree) => crate::ioctl::move_mount_onto(tree.as_fd(), target)
            .map(|()| Some(tree))
            .map_err(|e| Error::os(e, "move_mount")),
        Err(Errno::ENOSYS) => {
            mount(Some(&fd_path(source)), &fd_path(target), None::<&str>, MsFlags::MS_BIND, None::<&str>)
                .map(|()| None)
                .map_err(|e| Error::os(e, "mount"))
        }
        Err(e) => Err(Error::os(e, "open_tree")),
    }
}

/// Unlinks `dir/name` when the entry (not followed) passes `ours`; EEXIST when something else took the name.
fn unlink_if(dir: BorrowedFd, name: &str, ours: impl Fn(&FileStat) -> bool) -> Result<()> {
    let entry = stat::fstatat(dir.as_raw_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(|e| Error::os(e, "stat"))?;
    if !ours(&entry) {
        return Err(Error::os(Errno::EEXIST, "unlink").with_detail("the name no longer refers to our node; left alone"));
    }
    unlinkat(Some(dir.as_raw_fd()), name, UnlinkatFlags::NoRemoveDir).map_err(|e| Error::os(e, "unlink"))
}

/// Removes a node made by `Loop::mknod` when only its name is known (the remote client's side): the entry is
/// opened without following it (O_PATH|O_NOFOLLOW) and must be block device 7:N for `loopN` (bind-mounted or
/// mknod'ed), or the empty placeholder whose mount is gone already. Only the mount on that very entry is
/// detached, through the fd; anything else under the name (a symlink to a host mount, another device) is
/// refused with ERR_LOOP_UNEXPECTED_DEVICE and left alone.
pub fn remove_node(dir: BorrowedFd, name: &str) -> Result<()> {
    let path = || dir_path(Some(dir)).join(name);
    let index = name
        .strip_prefix("loop")
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|n| n.parse::<u32>().ok())
        .ok_or_else(|| Error::os(Errno::EINVAL, "unlink").with_path(&path()).with_detail("not a loop device name"))?;
    let entry = open_in(Some(dir), name, OFlag::O_PATH | OFlag::O_NOFOLLOW)?;
    let st = stat_fd(entry.as_fd()).map_err(|e| e.with_path(&path()))?;
    // loopN's device number from sysfs: with loop.max_part set, its minor is not N.
    let node = crate::inode::loop_devnum(std::path::Path::new("/sys"), index);
    let is_node = |st: &FileStat| is_kind(st, SFlag::S_IFBLK) && st.st_rdev == node;
    let is_placeholder = |st: &FileStat| is_kind(st, SFlag::S_IFREG) && st.st_size == 0;
    if !is_node(&st) && !is_placeholder(&st) {
        return Err(Error {
            kind: Kind::UnexpectedDevice {
                expected_minor: stat::minor(node) as u32,
                rdev: st.st_rdev,
                mode: st.st_mode,
            },
            detail: Some(format!("not loop device node {}:{}; left alone", stat::major(node), stat::minor(node))),
            ..Error::os(Errno::ENODEV, "unlink").with_path(&path())
        });
    }
    if is_node(&st) {
        // The magic link of our O_PATH fd is the mount on this entry and nothing else. UMOUNT_NOFOLLOW would
        // refuse the magic link itself. EINVAL = not a mount point (a mknod node); EPERM = not ours to undo.
        let _ = umount2(&fd_path(entry.as_fd()), MntFlags::MNT_DETACH);
    }
    // What the unmount uncovered is mknod's placeholder.
    unlink_if(dir, name, |now| is_node(now) || is_placeholder(now)).map_err(|e| e.with_path(&path()))
}
