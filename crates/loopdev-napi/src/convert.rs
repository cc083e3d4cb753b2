//! JS option objects ↔ core types.

use crate::handle::{Handle, Resource};
use crate::js::{Env, Failure, JsResult, Value};
use crate::sys::NAPI_OBJECT;
use loopdev::{Applied, AttachOptions, Attached, ConfigureOptions, Loop, LoopInfo, StatusChange};
use nix::errno::Errno;
use std::os::unix::io::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

/// A file descriptor argument: an integer ≥ 0 (the kernel answers EBADF for one that is not open).
pub fn fd(env: Env, v: Value, what: &str) -> JsResult<RawFd> {
    Ok(env.to_int(v, what, 0, i64::from(i32::MAX))? as RawFd)
}

/// A file descriptor argument for work that outlives the call (async work, or a call that runs JS midway):
/// our own duplicate, made now on the JS thread. Borrowing the number instead, JS could close it meanwhile,
/// or reuse it for another file, and the work would act on whatever the number then names.
pub fn owned_fd(env: Env, v: Value, what: &str) -> JsResult<OwnedFd> {
    dup(fd(env, v, what)?)
}

/// Our own duplicate of a caller's fd (see `owned_fd`).
pub fn dup(raw: RawFd) -> JsResult<OwnedFd> {
    // F_DUPFD_CLOEXEC (from 3 up), so the duplicate is not inherited by a child spawned meanwhile.
    borrow(raw).try_clone_to_owned().map_err(|e| {
        let errno = e.raw_os_error().map_or(Errno::EBADF, Errno::from_i32);
        Failure::Loop(loopdev::Error::os(errno, "fcntl"))
    })
}

pub fn u32_size(env: Env, v: Value, what: &str) -> JsResult<u32> {
    let n = env.to_u64(v, what)?;
    u32::try_from(n).map_err(|_| {
        Failure::Range(format!("The value of \"{what}\" is out of range. It must be <= {}. Received {n}", u32::MAX))
    })
}

/// An options argument: an object, or undefined/null for the defaults; anything else is a TypeError.
pub fn options(env: Env, o: Value) -> JsResult<Value> {
    if env.is_nullish(o)? || env.type_of(o)? == NAPI_OBJECT {
        Ok(o)
    } else {
        Err(Failure::Type("options must be an object".into()))
    }
}

/// Configure and attach options arrive as an array in this order (`optionArgs` in ts/binding.ts, which has
/// checked them already): reading elements is several times cheaper than looking up named properties through
/// N-API. `configure_options` reads the first eight.
const OPTION_FIELDS: [&str; 10] =
    ["offset", "sizeLimit", "blockSize", "autoclear", "partscan", "readOnly", "directIo", "fileName", "lock", "ownsFd"];

/// The one conversion of the options record: every call that configures a device reads its options here.
pub fn attach_options(env: Env, args: Value) -> JsResult<AttachOptions> {
    if env.is_nullish(args)? {
        return Ok(AttachOptions::default());
    }
    if !env.is_array(args)? {
        // Only the TS layer calls this; an options object here would silently mean "all defaults".
        return Err(Failure::Type("configure options must come as an array (optionArgs)".into()));
    }
    let mut v = [std::ptr::null_mut(); OPTION_FIELDS.len()];
    // The TS side leaves trailing defaults out: with no options, nothing is read.
    let given = env.array_length(args)? as usize;
    for (i, slot) in v.iter_mut().enumerate().take(given) {
        let field = env.element(args, i as u32)?;
        *slot = if env.is_nullish(field)? { std::ptr::null_mut() } else { field };
    }
    let size = |i: usize| if v[i].is_null() { Ok(0) } else { env.to_u64(v[i], OPTION_FIELDS[i]) };
    let flag = |i: usize| {
        if v[i].is_null() {
            Ok(false)
        } else {
            env.to_bool(v[i]).map_err(|_| Failure::Type(format!("{} must be a boolean", OPTION_FIELDS[i])))
        }
    };
    Ok(AttachOptions {
        configure: ConfigureOptions {
            offset: size(0)?,
            size_limit: size(1)?,
            block_size: if v[2].is_null() { 0 } else { u32_size(env, v[2], "blockSize")? },
            autoclear: flag(3)?,
            partscan: flag(4)?,
            read_only: flag(5)?,
            direct_io: flag(6)?,
            file_name: if v[7].is_null() { None } else { Some(env.to_string(v[7])?) },
        },
        lock: flag(8)?,
        owns_fd: flag(9)?,
    })
}

pub fn configure_options(env: Env, args: Value) -> JsResult<ConfigureOptions> {
    Ok(attach_options(env, args)?.configure)
}

pub fn status_change(env: Env, o: Value) -> JsResult<StatusChange> {
    let o = options(env, o)?;
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

/// `{ handle, minor, path, fd, applied }` for a device bound by `attach`; `applied` has the fields of
/// `Applied` in ts/device.ts.
pub fn attached(env: Env, a: Attached) -> JsResult<Value> {
    let Applied {
        offset,
        size_limit,
        size,
        block_size,
        read_only,
        partscan,
        autoclear,
        direct_io,
        backing_file,
        diskseq,
        device,
        inode,
    } = a.applied;
    let o = new_loop(env, a.lo)?;
    let applied = env.object()?;
    env.set(applied, "readOnly", env.boolean(read_only)?)?;
    env.set(applied, "directIo", env.boolean(direct_io)?)?;
    env.set(applied, "partscan", env.boolean(partscan)?)?;
    env.set(applied, "autoclear", env.boolean(autoclear)?)?;
    env.set(applied, "offset", env.bigint(offset)?)?;
    env.set(applied, "sizeLimit", env.bigint(size_limit)?)?;
    env.set(applied, "size", env.bigint(size)?)?;
    env.set(applied, "blockSize", env.int(i64::from(block_size))?)?;
    env.set(applied, "backingFile", env.string(&backing_file)?)?;
    env.set(
        applied,
        "diskseq",
        match diskseq {
            Some(seq) => env.bigint(seq)?,
            None => env.null()?,
        },
    )?;
    env.set(applied, "device", env.bigint(device)?)?;
    env.set(applied, "inode", env.bigint(inode)?)?;
    env.set(o, "applied", applied)?;
    Ok(o)
}

/// Borrows a caller's fd for the duration of a synchronous call that runs no JS (else see `owned_fd`).
pub fn borrow(fd: RawFd) -> BorrowedFd<'static> {
    // SAFETY: the fd number comes from JS and stays the caller's; we never close it, and the kernel answers
    // EBADF if it is not open. The 'static borrow never outlives the synchronous call using it, during which
    // no JS runs that could close it.
    unsafe { BorrowedFd::borrow_raw(fd) }
}
