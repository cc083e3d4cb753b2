//! One error type that keeps everything a caller needs to act on a failure: the errno, the syscall, the
//! ioctl and the path, so bindings can build errors shaped like Node's `SystemError`.

use nix::errno::Errno;
use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// A failed system call; `errno` says why.
    Os,
    /// The node opened is not the loop device that was asked for.
    UnexpectedDevice { expected_minor: u32, rdev: u64, mode: u32 },
    /// clearFdWait gave up: the device is still bound to the same file.
    Timeout,
    /// A partition table that cannot be trusted (CRC mismatch, misplaced structures, truncated image);
    /// `detail` says what is wrong with it.
    PartitionTable,
    /// `LoopControl::attach` found, on every device it tried, that the kernel did not apply what was asked;
    /// `differences` says what differed (`offset is 0, expected 512`), on the last device.
    ConfigMismatch { differences: Vec<String> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub kind: Kind,
    pub errno: Errno,
    pub syscall: &'static str,
    pub ioctl: Option<&'static str>,
    pub path: Option<PathBuf>,
    /// Replaces strerror in the message where the errno alone would mislead.
    pub detail: Option<String>,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn os(errno: Errno, syscall: &'static str) -> Self {
        Error { kind: Kind::Os, errno, syscall, ioctl: None, path: None, detail: None }
    }

    pub fn ioctl(errno: Errno, ioctl: &'static str) -> Self {
        Error { ioctl: Some(ioctl), ..Error::os(errno, "ioctl") }
    }

    /// A partition table we refuse to use. EUCLEAN ("structure needs cleaning") is what file systems
    /// report for on-disk corruption; the code is our own so callers need not guess from the errno.
    pub fn partition_table(detail: impl Into<String>) -> Self {
        Error { kind: Kind::PartitionTable, ..Error::os(Errno::EUCLEAN, "read") }.with_detail(detail)
    }

    pub fn with_path(mut self, path: &Path) -> Self {
        if self.path.is_none() {
            self.path = Some(path.to_path_buf());
        }
        self
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// `EBUSY`, `ERR_LOOP_UNEXPECTED_DEVICE`, … — the JS `code` property.
    pub fn code(&self) -> String {
        match self.kind {
            Kind::UnexpectedDevice { .. } => "ERR_LOOP_UNEXPECTED_DEVICE".to_string(),
            Kind::PartitionTable => "ERR_LOOP_PARTITION_TABLE".to_string(),
            Kind::ConfigMismatch { .. } => "ERR_LOOP_CONFIG_MISMATCH".to_string(),
            Kind::Os | Kind::Timeout => errno_name(self.errno),
        }
    }

    pub fn is(&self, errno: Errno) -> bool {
        self.kind == Kind::Os && self.errno == errno
    }
}

/// What the C library says of an errno, lowercased as in Node's messages (`device or resource busy`). Not
/// nix's `desc()`: its texts are the kernel header's comments ("Try again" for EAGAIN, "Not a typewriter"
/// for ENOTTY), which neither Node nor losetup print.
pub fn errno_text(errno: Errno) -> String {
    let text = std::io::Error::from_raw_os_error(errno as i32).to_string();
    let text = text.rsplit_once(" (os error ").map_or(text.as_str(), |(t, _)| t);
    lowercase_first(text)
}

/// The symbolic name of an errno (`EBUSY`); nix's Debug output is exactly that.
pub fn errno_name(errno: Errno) -> String {
    format!("{errno:?}")
}

impl fmt::Display for Error {
    /// Node's format: `EBUSY: device or resource busy, ioctl LOOP_CONFIGURE '/dev/loop3'`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match &self.detail {
            Some(d) => d.clone(),
            None => errno_text(self.errno),
        };
        write!(f, "{}: {}, {}", self.code(), text, self.syscall)?;
        if let Some(ioctl) = self.ioctl {
            write!(f, " {ioctl}")?;
        }
        if let Some(path) = &self.path {
            write!(f, " '{}'", path.display())?;
        }
        Ok(())
    }
}

fn lowercase_first(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(first) => first.to_lowercase().chain(c).collect(),
        None => String::new(),
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_looks_like_node() {
        let e = Error::ioctl(Errno::EBUSY, "LOOP_CONFIGURE").with_path(Path::new("/dev/loop3"));
        assert_eq!(e.to_string(), "EBUSY: device or resource busy, ioctl LOOP_CONFIGURE '/dev/loop3'");
        assert_eq!(e.code(), "EBUSY");
        let e = Error::os(Errno::EAGAIN, "flock").with_path(Path::new("/dev/loop3"));
        assert_eq!(e.to_string(), "EAGAIN: resource temporarily unavailable, flock '/dev/loop3'");
        assert_eq!(errno_text(Errno::ENOTTY), "inappropriate ioctl for device");
    }

    #[test]
    fn unexpected_device_has_its_own_code() {
        let e = Error {
            kind: Kind::UnexpectedDevice { expected_minor: 3, rdev: 0x103, mode: 0o20600 },
            ..Error::os(Errno::ENODEV, "fstat")
        };
        assert_eq!(e.code(), "ERR_LOOP_UNEXPECTED_DEVICE");
        assert!(!e.is(Errno::ENODEV));
    }

    #[test]
    fn first_path_wins() {
        let e = Error::os(Errno::ENOENT, "open").with_path(Path::new("/a")).with_path(Path::new("/b"));
        assert_eq!(e.path.as_deref(), Some(Path::new("/a")));
    }
}
