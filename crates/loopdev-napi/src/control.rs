//! Exports for `LoopControl`.

use crate::convert::{self, borrow};
use crate::handle::{self, Handle, Resource};
use crate::js::{arg, Env, Failure, JsResult, Value};
use crate::sys::{NAPI_FUNCTION, NAPI_NULL, NAPI_UNDEFINED};
use loopdev::{ConfigureOptions, Loop, LoopControl};
use std::os::unix::io::{AsFd, RawFd};
use std::sync::Arc;

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

/// The arguments of controlLoopForFd / controlLoopForFdAsync: (h, fd, configureArgs, lock, setup?).
struct Request {
    ctl: Arc<LoopControl>,
    /// The caller's: duplicated wherever JS can run before the work is done (see `convert::owned_fd`).
    fd: RawFd,
    opts: ConfigureOptions,
    lock: bool,
    setup: Option<Value>,
}

fn request(env: Env, args: &[Value]) -> JsResult<Request> {
    let setup = arg(env, args, 4)?;
    let setup = match env.type_of(setup)? {
        NAPI_UNDEFINED | NAPI_NULL => None,
        NAPI_FUNCTION => Some(setup),
        _ => return Err(Failure::Type("setup must be a function".into())),
    };
    let lock = arg(env, args, 3)?;
    Ok(Request {
        ctl: handle::control(env, arg(env, args, 0)?)?,
        fd: convert::fd(env, arg(env, args, 1)?, "fd")?,
        opts: convert::configure_options(env, arg(env, args, 2)?)?,
        lock: !env.is_nullish(lock)?
            && env.to_bool(lock).map_err(|_| Failure::Type("lock must be a boolean".into()))?,
        setup,
    })
}

/// controlLoopForFd(h, fd, configureArgs, lock, setup?) → { handle, minor, path, fd }
/// `setup(loop)` runs on a temporary handle (same open file) that is closed when it returns.
pub fn loop_for_fd(env: Env, args: &[Value]) -> JsResult<Value> {
    let r = request(env, args)?;
    // `setup` runs JS in the middle of the call, which could close the caller's fd; without one, no JS runs.
    let owned = r.setup.map(|_| convert::dup(r.fd)).transpose()?;
    let fd = owned.as_ref().map_or_else(|| borrow(r.fd), |o| o.as_fd());
    let call = r.setup.map(|func| move |lo: &Loop| setup::run(env, func, lo.try_clone()?));
    let lo = r.ctl.loop_for_fd(fd, &r.opts, r.lock, call)?;
    convert::new_loop(env, lo)
}

/// controlLoopForFdAsync(h, fd, configureArgs, lock, setup?) → Promise<{ handle, minor, path, fd }>
/// The retry loop runs on the pool; `setup` is called on the JS thread through a threadsafe function
/// while the worker waits for it.
pub fn loop_for_fd_async(env: Env, args: &[Value]) -> JsResult<Value> {
    let Request { ctl, fd, opts, lock, setup } = request(env, args)?;
    let fd = convert::dup(fd)?;
    let setup = setup.map(|func| setup::Remote::new(env, func)).transpose()?;
    crate::task::spawn(
        env,
        "loopdev.loopForFd",
        move || {
            let call = setup.as_ref().map(|remote| move |lo: &Loop| remote.call(lo.try_clone()?));
            ctl.loop_for_fd(fd.as_fd(), &opts, lock, call)
        },
        convert::new_loop,
    )
}

/// attach(fd, optionArgs) → { handle, minor, path, fd, applied }: `LoopControl::attach` (get-free, configure,
/// verify, retry) through a loop-control of its own, so an attach is one call.
pub fn attach(env: Env, args: &[Value]) -> JsResult<Value> {
    let fd = convert::fd(env, arg(env, args, 0)?, "fd")?;
    let opts = convert::attach_options(env, arg(env, args, 1)?)?;
    let attached = LoopControl::open(None)?.attach(borrow(fd), &opts)?;
    convert::attached(env, attached)
}

/// attachAsync(fd, optionArgs) → Promise<{ handle, minor, path, fd, applied }>, all of it on the pool.
pub fn attach_async(env: Env, args: &[Value]) -> JsResult<Value> {
    let fd = convert::owned_fd(env, arg(env, args, 0)?, "fd")?;
    let opts = convert::attach_options(env, arg(env, args, 1)?)?;
    crate::task::spawn(
        env,
        "loopdev.attach",
        move || Ok(LoopControl::open(None)?.attach(fd.as_fd(), &opts)?),
        convert::attached,
    )
}

mod setup {
    use crate::convert;
    use crate::handle;
    use crate::js::{no_unwind, Env, Failure, JsResult, Value};
    use crate::sys::*;
    use loopdev::Loop;
    use std::ffi::c_void;
    use std::ptr;
    use std::sync::mpsc;

    /// A JS `setup` callback callable from a worker thread.
    pub struct Remote(napi_threadsafe_function);

    // SAFETY: threadsafe functions are made to be called and released from any thread.
    unsafe impl Send for Remote {}

    struct Call {
        lo: Loop,
        reply: mpsc::SyncSender<JsResult<()>>,
    }

    impl Remote {
        pub fn new(env: Env, func: Value) -> JsResult<Remote> {
            let name = env.string("loopdev.loopForFd.setup")?;
            let mut tsfn = ptr::null_mut();
            // SAFETY: valid env and values; no finalizer or context; call_js matches the Call data we send.
            let status = unsafe {
                napi_create_threadsafe_function(
                    env.0,
                    func,
                    ptr::null_mut(),
                    name,
                    0,
                    1,
                    ptr::null_mut(),
                    None,
                    ptr::null_mut(),
                    Some(call_js),
                    &mut tsfn,
                )
            };
            if status != NAPI_OK {
                return Err(Failure::Pending);
            }
            Ok(Remote(tsfn))
        }

        /// Runs the callback on the JS thread with a temporary handle on `lo`, waiting for it to return.
        pub fn call(&self, lo: Loop) -> JsResult<()> {
            let (reply, answer) = mpsc::sync_channel(1);
            let call = Box::into_raw(Box::new(Call { lo, reply }));
            // SAFETY: the tsfn is alive until Drop; ownership of `call` passes to call_js on success.
            let status = unsafe { napi_call_threadsafe_function(self.0, call.cast(), NAPI_TSFN_BLOCKING) };
            if status != NAPI_OK {
                // SAFETY: not queued, so still ours.
                drop(unsafe { Box::from_raw(call) });
                return Err(Failure::Internal("setup callback could not be called (environment closing)".into()));
            }
            answer.recv().unwrap_or_else(|_| Err(Failure::Internal("setup callback was dropped".into())))
        }
    }

    impl Drop for Remote {
        fn drop(&mut self) {
            // SAFETY: we hold the one thread count taken at creation.
            unsafe { napi_release_threadsafe_function(self.0, NAPI_TSFN_RELEASE) };
        }
    }

    unsafe extern "C" fn call_js(env: napi_env, func: napi_value, _context: *mut c_void, data: *mut c_void) {
        // SAFETY: `data` is the Call boxed in Remote::call; call_js runs once per call.
        let Call { lo, reply } = *unsafe { Box::from_raw(data.cast::<Call>()) };
        no_unwind(|| {
            let result = if env.is_null() {
                Err(Failure::Internal("setup callback was not run: the environment is closing".into()))
            } else {
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(Env(env), func, lo)))
                    .unwrap_or_else(|_| Err(Failure::Internal("internal error (panic) in loopdev native code".into())))
            };
            // The worker waits for this answer: send one whatever happened.
            let _ = reply.send(result);
        });
    }

    /// Calls `func` with a view of `lo` that is closed afterwards; a throw comes back as `Failure::Thrown`.
    pub fn run(env: Env, func: Value, lo: Loop) -> JsResult<()> {
        let view = convert::new_loop(env, lo)?;
        let view_handle = env.get(view, "handle")?;
        let called = env.call(func, &[view]);
        let thrown = if env.exception_pending() { Some(env.take_exception()?) } else { None };
        drop(handle::take(env, view_handle)?); // closed already if JS closed the view (the TS wrapper does)
        match (called, thrown) {
            (_, Some(t)) => Err(Failure::Thrown(t)),
            (result, None) => result.map(drop),
        }
    }
}
