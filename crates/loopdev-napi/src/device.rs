//! Exports for `Loop`. Each takes the loop handle first.

use crate::convert::{self, borrow};
use crate::handle;
use crate::js::{arg, Env, JsResult, Value};
use loopdev::Loop;
use std::os::unix::io::AsFd;
use std::time::Duration;

fn this(env: Env, args: &[Value]) -> JsResult<std::sync::Arc<Loop>> {
    handle::lo(env, arg(env, args, 0)?)
}

fn fd_at(env: Env, args: &[Value], i: usize, what: &str) -> JsResult<std::os::unix::io::RawFd> {
    convert::fd(env, arg(env, args, i)?, what)
}

fn done(env: Env, _: ()) -> JsResult<Value> {
    env.undefined()
}

/// loopOpen(minor, dirFd?) → { handle, minor, path, fd }
pub fn open(env: Env, args: &[Value]) -> JsResult<Value> {
    let minor = env.to_int(arg(env, args, 0)?, "minor", 0, i64::from(u32::MAX >> 12))? as u32;
    let dir = arg(env, args, 1)?;
    let dir = if env.is_nullish(dir)? { None } else { Some(convert::fd(env, dir, "dirFd")?) };
    convert::new_loop(env, Loop::open(minor, dir.map(borrow))?)
}

/// close(handle) → whether it was still open: either kind; idempotent.
pub fn close(env: Env, args: &[Value]) -> JsResult<Value> {
    let taken = handle::take(env, arg(env, args, 0)?)?;
    env.boolean(taken.is_some())
}

/// closeAsync(handle) → Promise<whether it was still open>: `close`, with the closing itself on the pool.
/// Since Linux 6.11 the last close of a loop device runs its teardown, flushing the device's dirty page
/// cache to the backing file first, which must not stall the event loop.
pub fn close_async(env: Env, args: &[Value]) -> JsResult<Value> {
    let taken = handle::take(env, arg(env, args, 0)?)?;
    let was_open = taken.is_some();
    crate::task::spawn(
        env,
        "loopdev.close",
        move || {
            drop(taken);
            Ok(was_open)
        },
        |env, was_open| env.boolean(was_open),
    )
}

pub fn flock(env: Env, args: &[Value]) -> JsResult<Value> {
    let op = env.to_int(arg(env, args, 1)?, "operation", 0, 15)? as i32;
    this(env, args)?.flock(op)?;
    env.undefined()
}

pub fn flush_buf(env: Env, args: &[Value]) -> JsResult<Value> {
    this(env, args)?.flush_buf()?;
    env.undefined()
}

pub fn set_fd(env: Env, args: &[Value]) -> JsResult<Value> {
    this(env, args)?.set_fd(borrow(fd_at(env, args, 1, "fd")?))?;
    env.undefined()
}

pub fn clear_fd(env: Env, args: &[Value]) -> JsResult<Value> {
    this(env, args)?.clear_fd()?;
    env.undefined()
}

fn wait_args(env: Env, args: &[Value]) -> JsResult<(std::os::unix::io::RawFd, Duration, Duration)> {
    let fd = fd_at(env, args, 1, "fd")?;
    let (timeout, wait) = detach_args(env, args.get(1..).unwrap_or(&[]))?;
    Ok((fd, timeout, wait))
}

pub fn clear_fd_wait(env: Env, args: &[Value]) -> JsResult<Value> {
    let (fd, timeout, wait) = wait_args(env, args)?;
    this(env, args)?.clear_fd_wait(borrow(fd), timeout, wait)?;
    env.undefined()
}

pub fn clear_fd_wait_async(env: Env, args: &[Value]) -> JsResult<Value> {
    let lo = this(env, args)?;
    let fd = convert::owned_fd(env, arg(env, args, 1)?, "fd")?;
    let (timeout, wait) = detach_args(env, args.get(1..).unwrap_or(&[]))?;
    crate::task::spawn(env, "loopdev.clearFdWait", move || Ok(lo.clear_fd_wait(fd.as_fd(), timeout, wait)?), done)
}

fn detach_args(env: Env, args: &[Value]) -> JsResult<(Duration, Duration)> {
    let timeout = env.to_int(arg(env, args, 1)?, "timeoutMs", 0, 1 << 40)? as u64;
    let wait = env.to_int(arg(env, args, 2)?, "waitMs", 1, 1 << 40)? as u64;
    Ok((Duration::from_millis(timeout), Duration::from_millis(wait)))
}

/// loopDetach(h, timeoutMs, waitMs): verified detach of the current backing file.
pub fn detach(env: Env, args: &[Value]) -> JsResult<Value> {
    let (timeout, wait) = detach_args(env, args)?;
    this(env, args)?.detach(timeout, wait)?;
    env.undefined()
}

pub fn detach_async(env: Env, args: &[Value]) -> JsResult<Value> {
    let lo = this(env, args)?;
    let (timeout, wait) = detach_args(env, args)?;
    crate::task::spawn(env, "loopdev.detach", move || Ok(lo.detach(timeout, wait)?), done)
}

/// loopDisposeAsync(h, timeoutMs, waitMs): `await using`'s end in one trip to the pool: the handle is
/// closed for JS at once; the verified detach and then the close (the device's teardown) run on the pool.
/// Rejects with the detach's error, the device closed all the same.
pub fn dispose_async(env: Env, args: &[Value]) -> JsResult<Value> {
    let (timeout, wait) = detach_args(env, args)?;
    let lo = handle::take_loop(env, arg(env, args, 0)?)?;
    crate::task::spawn(env, "loopdev.dispose", move || Ok(lo.map_or(Ok(()), |lo| lo.detach(timeout, wait))?), done)
}

pub fn change_fd(env: Env, args: &[Value]) -> JsResult<Value> {
    this(env, args)?.change_fd(borrow(fd_at(env, args, 1, "fd")?))?;
    env.undefined()
}

pub fn is_bound_to(env: Env, args: &[Value]) -> JsResult<Value> {
    let bound = this(env, args)?.is_bound_to(borrow(fd_at(env, args, 1, "fd")?))?;
    env.boolean(bound)
}

pub fn set_status(env: Env, args: &[Value]) -> JsResult<Value> {
    let change = convert::status_change(env, arg(env, args, 1)?)?;
    this(env, args)?.set_status(&change)?;
    env.undefined()
}

pub fn get_status(env: Env, args: &[Value]) -> JsResult<Value> {
    let info = this(env, args)?.get_status()?;
    convert::info(env, info)
}

pub fn configure(env: Env, args: &[Value]) -> JsResult<Value> {
    let fd = fd_at(env, args, 1, "fd")?;
    let opts = convert::configure_options(env, arg(env, args, 2)?)?;
    this(env, args)?.configure(borrow(fd), &opts)?;
    env.undefined()
}

pub fn configure_async(env: Env, args: &[Value]) -> JsResult<Value> {
    let lo = this(env, args)?;
    let fd = convert::owned_fd(env, arg(env, args, 1)?, "fd")?;
    let opts = convert::configure_options(env, arg(env, args, 2)?)?;
    crate::task::spawn(env, "loopdev.configure", move || Ok(lo.configure(fd.as_fd(), &opts)?), done)
}

pub fn set_direct_io(env: Env, args: &[Value]) -> JsResult<Value> {
    let on = env.to_bool(arg(env, args, 1)?)?;
    this(env, args)?.set_direct_io(on)?;
    env.undefined()
}

pub fn set_block_size(env: Env, args: &[Value]) -> JsResult<Value> {
    let size = convert::u32_size(env, arg(env, args, 1)?, "blockSize")?;
    this(env, args)?.set_block_size(size)?;
    env.undefined()
}

pub fn set_capacity(env: Env, args: &[Value]) -> JsResult<Value> {
    this(env, args)?.set_capacity()?;
    env.undefined()
}

pub fn mknod(env: Env, args: &[Value]) -> JsResult<Value> {
    let dir = fd_at(env, args, 1, "dirFd")?;
    let mode = env.to_int(arg(env, args, 2)?, "mode", 0, 0o7777)? as u32;
    // JS removes the node by name (removeNode), which checks what it finds; the record is not needed.
    drop(this(env, args)?.mknod(borrow(dir), mode)?);
    env.undefined()
}

/// removeNode(dirFd, name)
pub fn remove_node(env: Env, args: &[Value]) -> JsResult<Value> {
    let dir = fd_at(env, args, 0, "dirFd")?;
    let name = env.to_string(arg(env, args, 1)?)?;
    loopdev::remove_node(borrow(dir), &name)?;
    env.undefined()
}
