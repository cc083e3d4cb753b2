//! Which processes have a block device open, from `/proc/<pid>/fd`: for the errors that name what keeps a
//! loop device from detaching. It stats every fd of every process it may look at (thousands on a busy
//! host, tens of milliseconds), so the async API runs it on the pool, never on the JS thread.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opener {
    pub pid: i32,
    /// `/proc/<pid>/comm`, or `?` once the process has gone.
    pub comm: String,
}

/// Processes with an fd open on one of `devs` (device numbers as in `st_rdev`), in pid order. Processes that
/// are gone, or not ours to look at, are passed over.
pub fn openers(devs: &[u64]) -> Vec<Opener> {
    if devs.is_empty() {
        return Vec::new(); // nothing to look for: no scan (it takes milliseconds)
    }
    let procs = match std::fs::read_dir("/proc") {
        Ok(procs) => procs,
        Err(_) => return Vec::new(),
    };
    let mut found: Vec<Opener> = procs
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<i32>().ok()?;
            holds(&entry.path(), devs).then(|| Opener { pid, comm: comm(&entry.path()) })
        })
        .collect();
    found.sort_by_key(|o| o.pid);
    found
}

fn holds(proc_dir: &Path, devs: &[u64]) -> bool {
    let fds = match std::fs::read_dir(proc_dir.join("fd")) {
        Ok(fds) => fds,
        Err(_) => return false,
    };
    fds.flatten().any(|fd| {
        std::fs::metadata(fd.path()).map_or(false, |m| m.file_type().is_block_device() && devs.contains(&m.rdev()))
    })
}

fn comm(proc_dir: &Path) -> String {
    std::fs::read_to_string(proc_dir.join("comm")).map_or_else(|_| "?".into(), |c| c.trim_end().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_process_holding_the_device_is_named_and_others_are_not() {
        // An unbound loop device: a block device node every machine that runs these tests has.
        let ctl = crate::LoopControl::open(None).unwrap();
        let minor = ctl.get_unbound().unwrap();
        let node = std::fs::File::open(format!("/dev/loop{minor}")).unwrap();
        let rdev = node.metadata().unwrap().rdev();
        let me = std::process::id() as i32;
        assert!(openers(&[rdev]).iter().any(|o| o.pid == me && !o.comm.is_empty()), "{:?}", openers(&[rdev]));
        drop(node);
        assert!(!openers(&[rdev]).iter().any(|o| o.pid == me), "closed: no longer named");
    }
}
