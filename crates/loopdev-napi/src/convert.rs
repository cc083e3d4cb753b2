//! JS option objects ↔ core types.

use crate::handle::{Handle, Resource};
use crate::js::{Env, JsResult, Value};
use loopdev::{ConfigureOptions, Loop, LoopInfo, StatusChange};
use std::os::unix::io::{AsFd, AsRawFd, BorrowedFd, RawFd};

/// A file descriptor argument: an integer ≥ 0 (the kernel answers EBADF for one that is not open).
pub fn fd(env: Env, v: Value, what: &str) -> JsResult<RawFd> {
    Ok(env.to_int(v, what, 0, i64::from(i32::MAX))? as RawFd)
}

pub fn u32_size(env: Env, v: Value, what: &str) -> JsResult<u32> {
    let n = env.to_u64(v, what)?;
    u32::try_from(n).map_err(|_| crate::js::Failure::Range(format!("{what} must be at most {}", u32::MAX)))
}

pub fn configure_options(env: Env, o: Value) -> JsResult<ConfigureOptions> {
    Ok(ConfigureOptions {
        offset: env.opt_u64(o, "offset")?.unwrap_or(0),
        size_limit: env.opt_u64(o, "sizeLimit")?.unwrap_or(0),
        block_size: env.opt(o, "blockSize")?.map(|v| u32_size(env, v, "blockSize")).transpose()?.unwrap_or(0),
        autoclear: env.opt_bool(o, "autoclear")?.unwrap_or(false),
        partscan: env.opt_bool(o, "partscan")?.unwrap_or(false),
        read_only: env.opt_bool(o, "readOnly")?.unwrap_or(false),
        direct_io: env.opt_bool(o, "directIo")?.unwrap_or(false),
    })
}

pub fn status_change(env: Env, o: Value) -> JsResult<StatusChange> {
    Ok(StatusChange {
        offset: env.opt_u64(o, "offset")?,
        size_limit: env.opt_u64(o, "sizeLimit")?,
        autoclear: env.opt_bool(o, "autoclear")?,
        partscan: env.opt_bool(o, "partscan")?,
        read_only: env.opt_bool(o, "readOnly")?,
    })
}

pub fn info(env: Env, i: LoopInfo) -> JsResult<Value> {
    let o = env.object()?;
    env.set(o, "device", env.bigint(i.device)?)?;
    env.set(o, "inode", env.bigint(i.inode)?)?;
    env.set(o, "rdevice", env.bigint(i.rdevice)?)?;
    env.set(o, "offset", env.bigint(i.offset)?)?;
    env.set(o, "sizeLimit", env.bigint(i.size_limit)?)?;
    env.set(o, "number", env.int(i64::from(i.number))?)?;
    env.set(o, "flags", env.int(i64::from(i.flags))?)?;
    env.set(o, "fileName", env.string(&i.file_name)?)?;
    Ok(o)
}

/// `{ handle, minor, path, fd }` for a freshly opened or allocated loop device.
pub fn new_loop(env: Env, lo: Loop) -> JsResult<Value> {
    let o = env.object()?;
    env.set(o, "minor", env.int(i64::from(lo.minor()))?)?;
    env.set(o, "path", env.string(&lo.path().to_string_lossy())?)?;
    env.set(o, "fd", env.int(i64::from(lo.as_fd().as_raw_fd()))?)?;
    env.set(o, "handle", env.external(Resource::Loop(Handle::new(lo)))?)?;
    Ok(o)
}

/// Borrows a caller's fd for the duration of a call.
pub fn borrow(fd: RawFd) -> BorrowedFd<'static> {
    // SAFETY: the fd number comes from JS and stays the caller's; we never close it, and the kernel answers
    // EBADF if it is not open. The 'static borrow never outlives the call (or the async work) using it.
    unsafe { BorrowedFd::borrow_raw(fd) }
}
