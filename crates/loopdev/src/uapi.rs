//! Kernel ABI of `<linux/loop.h>` and the few block-layer ioctls we use.
//! Layouts are asserted at compile time: a mismatch would corrupt kernel reads, not fail loudly.

use std::mem::size_of;

pub const LOOP_MAJOR: u32 = 7;

pub const LO_FLAGS_READ_ONLY: u32 = 1;
pub const LO_FLAGS_AUTOCLEAR: u32 = 4;
pub const LO_FLAGS_PARTSCAN: u32 = 8;
pub const LO_FLAGS_DIRECT_IO: u32 = 16;

pub const LO_NAME_SIZE: usize = 64;
pub const LO_KEY_SIZE: usize = 32;

pub const LOOP_SET_FD: u32 = 0x4C00;
pub const LOOP_CLR_FD: u32 = 0x4C01;
pub const LOOP_SET_STATUS64: u32 = 0x4C04;
pub const LOOP_GET_STATUS64: u32 = 0x4C05;
pub const LOOP_CHANGE_FD: u32 = 0x4C06;
pub const LOOP_SET_CAPACITY: u32 = 0x4C07;
pub const LOOP_SET_DIRECT_IO: u32 = 0x4C08;
pub const LOOP_SET_BLOCK_SIZE: u32 = 0x4C09;
pub const LOOP_CONFIGURE: u32 = 0x4C0A;
pub const LOOP_CTL_ADD: u32 = 0x4C80;
pub const LOOP_CTL_REMOVE: u32 = 0x4C81;
pub const LOOP_CTL_GET_FREE: u32 = 0x4C82;
/// `_IO(0x12, 97)` from `<linux/fs.h>`.
pub const BLKFLSBUF: u32 = 0x1261;

/// `_IO(0x12, 104)`: logical sector size (an int).
pub const BLKSSZGET: u32 = 0x1268;
/// `_IO(0x12, 105)` from `<linux/blkpg.h>`: add or delete one partition of a disk.
pub const BLKPG: u32 = 0x1269;
pub const BLKPG_ADD_PARTITION: i32 = 1;
pub const BLKPG_DEL_PARTITION: i32 = 2;
pub const BLKPG_DEVNAMELTH: usize = 64;
pub const BLKPG_VOLNAMELTH: usize = 64;

/// Inode flags of `<linux/fs.h>` (FS_IOC_GETFLAGS): writes through a loop device must not bypass them.
pub const FS_IMMUTABLE_FL: u32 = 0x10;
pub const FS_APPEND_FL: u32 = 0x20;

/// `struct loop_info64`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LoopInfo64 {
    pub lo_device: u64,
    pub lo_inode: u64,
    pub lo_rdevice: u64,
    pub lo_offset: u64,
    pub lo_sizelimit: u64,
    pub lo_number: u32,
    pub lo_encrypt_type: u32,
    pub lo_encrypt_key_size: u32,
    pub lo_flags: u32,
    pub lo_file_name: [u8; LO_NAME_SIZE],
    pub lo_crypt_name: [u8; LO_NAME_SIZE],
    pub lo_encrypt_key: [u8; LO_KEY_SIZE],
    pub lo_init: [u64; 2],
}

/// `struct loop_config` (LOOP_CONFIGURE, Linux ≥ 5.8).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct LoopConfig {
    pub fd: u32,
    pub block_size: u32,
    pub info: LoopInfo64,
    pub reserved: [u64; 8],
}

/// `struct blkpg_ioctl_arg`: `data` points at a `BlkpgPartition` of `datalen` bytes.
#[repr(C)]
pub struct BlkpgIoctlArg {
    pub op: i32,
    pub flags: i32,
    pub datalen: i32,
    pub data: *mut BlkpgPartition,
}

/// `struct blkpg_partition`: start and length in bytes; the names are unused by the kernel.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlkpgPartition {
    pub start: i64,
    pub length: i64,
    pub pno: i32,
    pub devname: [u8; BLKPG_DEVNAMELTH],
    pub volname: [u8; BLKPG_VOLNAMELTH],
}

const _: () = assert!(size_of::<BlkpgPartition>() == 152);
const _: () = assert!(size_of::<BlkpgIoctlArg>() == 8 + 4 + 4 + size_of::<usize>());
const _: () = assert!(size_of::<LoopInfo64>() == 232);
const _: () = assert!(size_of::<LoopConfig>() == 304);

impl Default for LoopInfo64 {
    fn default() -> Self {
        // SAFETY: every field is an integer or an integer array, for which all-zero is valid.
        unsafe { std::mem::zeroed() }
    }
}

impl Default for LoopConfig {
    fn default() -> Self {
        // SAFETY: as for LoopInfo64, all-zero is a valid value of every field.
        unsafe { std::mem::zeroed() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `offset_of!` without needing Rust 1.77 (Debian 12 ships 1.63).
    macro_rules! offset_of {
        ($ty:ty, $field:ident) => {{
            let base = std::mem::MaybeUninit::<$ty>::uninit();
            let p = base.as_ptr();
            // SAFETY: addr_of! computes the field address without reading the uninitialised value.
            unsafe { std::ptr::addr_of!((*p).$field) as usize - p as usize }
        }};
    }

    #[test]
    fn field_offsets_match_the_kernel_header() {
        assert_eq!(offset_of!(LoopInfo64, lo_number), 40);
        assert_eq!(offset_of!(LoopInfo64, lo_flags), 52);
        assert_eq!(offset_of!(LoopInfo64, lo_file_name), 56);
        assert_eq!(offset_of!(LoopInfo64, lo_init), 216);
        assert_eq!(offset_of!(LoopConfig, info), 8);
        assert_eq!(offset_of!(LoopConfig, reserved), 240);
        assert_eq!(offset_of!(BlkpgPartition, pno), 16);
        assert_eq!(offset_of!(BlkpgPartition, devname), 20);
        assert_eq!(offset_of!(BlkpgIoctlArg, data), if cfg!(target_pointer_width = "64") { 16 } else { 12 });
    }
}
