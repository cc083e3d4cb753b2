//! Exports for `LoopControl`.

use crate::convert::{self, borrow};
use crate::handle::{self, Handle, Resource};
use crate::js::{arg, Env, Failure, JsResult, Value};
use loopdev::{Loop, LoopControl};

/// controlOpen(dirFd?) → handle
pub fn open(env: Env, args: &[Value]) -> JsResult<Value> {
    let dir = arg(env, args, 0)?;
    let dir = if env.is_nullish(dir)? { None } else { Some(convert::fd(env, dir, "dirFd")?) };
    let ctl = LoopControl::open(dir.map(borrow))?;
    env.external(Resource::Control(Handle::new(ctl)))
}

fn minor(env: Env, v: Value) -> JsResult<Option<u32>> {
    let m = env.to_int(v, "minor", -1, i64::from(i32::MAX))?;
    Ok(u32::try_from(m).ok())
}

/// controlAdd(h, minor) → minor
pub fn add(env: Env, args: &[Value]) -> JsResult<Value> {
    let ctl = handle::control(env, arg(env, args, 0)?)?;
    let m = ctl.add(minor(env, arg(env, args, 1)?)?)?;
    env.int(i64::from(m))
}

/// controlRemove(h, minor)
pub fn remove(env: Env, args: &[Value]) -> JsResult<Value> {
    let ctl = handle::control(env, arg(env, args, 0)?)?;
    ctl.remove(minor(env, arg(env, args, 1)?)?)?;
    env.undefined()
}

/// controlGetUnbound(h) → minor
pub fn get_unbound(env: Env, args: &[Value]) -> JsResult<Value> {
    let ctl = handle::control(env, arg(env, args, 0)?)?;
    env.int(i64::from(ctl.get_unbound()?))
}

/// controlLoopForFd(h, fd, options, lock, setup?) → { handle, minor, path, fd }
/// `setup(loop)` runs on a temporary handle (same open file) that is closed when it returns.
pub fn loop_for_fd(env: Env, args: &[Value]) -> JsResult<Value> {
    let ctl = handle::control(env, arg(env, args, 0)?)?;
    let fd = convert::fd(env, arg(env, args, 1)?, "fd")?;
    let opts = convert::configure_options(env, arg(env, args, 2)?)?;
    let lock = env.to_bool(arg(env, args, 3)?)?;
    let setup = arg(env, args, 4)?;
    let setup = if env.is_nullish(setup)? { None } else { Some(setup) };
    let lo = ctl.loop_for_fd(borrow(fd), &opts, lock, |lo: &Loop| -> JsResult<()> {
        let Some(setup) = setup else { return Ok(()) };
        let view = convert::new_loop(env, lo.try_clone()?)?;
        let view_handle = env.get(view, "handle")?;
        let result = env.call(setup, &[view]);
        handle::close(env, view_handle)?;
        result.map(drop)
    })?;
    convert::new_loop(env, lo)
}

/// controlLoopForFdAsync(h, fd, options, lock) → Promise<{ handle, minor, path, fd }>
pub fn loop_for_fd_async(env: Env, args: &[Value]) -> JsResult<Value> {
    let ctl = handle::control(env, arg(env, args, 0)?)?;
    let fd = convert::fd(env, arg(env, args, 1)?, "fd")?;
    let opts = convert::configure_options(env, arg(env, args, 2)?)?;
    let lock = env.to_bool(arg(env, args, 3)?)?;
    crate::task::spawn(
        env,
        "loopdev.loopForFd",
        move || ctl.loop_for_fd(borrow(fd), &opts, lock, |_| Ok::<(), Failure>(())),
        convert::new_loop,
    )
}
