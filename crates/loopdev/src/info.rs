//! The decoded form of `struct loop_info64`.

use crate::uapi::{self, LoopInfo64};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopInfo {
    pub device: u64,
    pub inode: u64,
    pub rdevice: u64,
    pub offset: u64,
    pub size_limit: u64,
    pub number: u32,
    pub flags: u32,
    pub file_name: String,
}

impl LoopInfo {
    pub fn autoclear(&self) -> bool {
        self.flags & uapi::LO_FLAGS_AUTOCLEAR != 0
    }
    pub fn read_only(&self) -> bool {
        self.flags & uapi::LO_FLAGS_READ_ONLY != 0
    }
    pub fn partscan(&self) -> bool {
        self.flags & uapi::LO_FLAGS_PARTSCAN != 0
    }
    pub fn direct_io(&self) -> bool {
        self.flags & uapi::LO_FLAGS_DIRECT_IO != 0
    }
    /// Whether the backing file is the inode `(dev, ino)`, as `fstat` reports them.
    pub fn is_bound_to(&self, dev: u64, ino: u64) -> bool {
        self.device == dev && self.inode == ino
    }
}

impl From<&LoopInfo64> for LoopInfo {
    fn from(raw: &LoopInfo64) -> Self {
        // The kernel truncates long names without guaranteeing a NUL inside the 64 bytes.
        let name = &raw.lo_file_name;
        let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        LoopInfo {
            device: raw.lo_device,
            inode: raw.lo_inode,
            rdevice: raw.lo_rdevice,
            offset: raw.lo_offset,
            size_limit: raw.lo_sizelimit,
            number: raw.lo_number,
            flags: raw.lo_flags,
            file_name: String::from_utf8_lossy(&name[..len]).into_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_flags_and_trims_the_name() {
        let mut raw =
            LoopInfo64 { lo_flags: uapi::LO_FLAGS_AUTOCLEAR | uapi::LO_FLAGS_DIRECT_IO, ..Default::default() };
        raw.lo_file_name[..8].copy_from_slice(b"/tmp/img");
        let info = LoopInfo::from(&raw);
        assert_eq!(info.file_name, "/tmp/img");
        assert!(info.autoclear() && info.direct_io());
        assert!(!info.read_only() && !info.partscan());
    }

    #[test]
    fn a_full_name_without_nul_is_kept_whole() {
        let raw = LoopInfo64 { lo_file_name: [b'a'; 64], ..Default::default() };
        assert_eq!(LoopInfo::from(&raw).file_name.len(), 64);
    }

    #[test]
    fn bound_to_compares_dev_and_ino() {
        let info = LoopInfo::from(&LoopInfo64 { lo_device: 0x801, lo_inode: 12, ..Default::default() });
        assert!(info.is_bound_to(0x801, 12));
        assert!(!info.is_bound_to(0x801, 13));
    }
}
