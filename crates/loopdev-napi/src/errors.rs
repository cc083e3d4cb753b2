//! Failures → JS errors. The TS layer registers its `LoopError` / `UnexpectedDeviceError` classes once
//! (`init`), so errors leave native code already typed and with Node's SystemError fields.

use crate::js::{Env, Failure, JsResult, Value};
use crate::sys::*;
use std::ffi::c_void;
use std::ptr;

struct Classes {
    loop_error: napi_ref,
    unexpected_device: napi_ref,
}

/// `init({ LoopError, UnexpectedDeviceError })`.
pub fn init(env: Env, args: &[Value]) -> JsResult<Value> {
    let classes = crate::js::arg(env, args, 0)?;
    let data = Box::new(Classes {
        loop_error: env.reference(env.get(classes, "LoopError")?)?,
        unexpected_device: env.reference(env.get(classes, "UnexpectedDeviceError")?)?,
    });
    unsafe extern "C" fn free(_env: napi_env, data: *mut c_void, _hint: *mut c_void) {
        // SAFETY: the Box leaked in init; N-API calls this once when the env goes away.
        crate::js::no_unwind(|| drop(unsafe { Box::from_raw(data.cast::<Classes>()) }));
    }
    // SAFETY: valid env; ownership of the box passes to N-API, freed by `free`.
    let status = unsafe { napi_set_instance_data(env.0, Box::into_raw(data).cast(), Some(free), ptr::null_mut()) };
    if status != NAPI_OK {
        return Err(Failure::Pending);
    }
    env.undefined()
}

fn classes<'a>(env: Env) -> Option<&'a Classes> {
    let mut data: *mut c_void = ptr::null_mut();
    // SAFETY: valid env and out-pointer; the data, if any, is the Classes set by init.
    unsafe { napi_get_instance_data(env.0, &mut data) };
    // SAFETY: set only by init, to a Box<Classes> that lives as long as the env.
    (!data.is_null()).then(|| unsafe { &*data.cast::<Classes>() })
}

/// Throws the JS error for a failure (or makes sure something is pending, for `Failure::Pending`).
pub fn throw(env: Env, failure: Failure) {
    if let Failure::Pending = failure {
        if !env.exception_pending() {
            let msg = b"N-API call failed\0";
            // SAFETY: valid env and NUL-terminated message.
            unsafe { napi_throw_error(env.0, ptr::null(), msg.as_ptr().cast()) };
        }
        return;
    }
    match to_js(env, &failure) {
        Ok(err) if !env.exception_pending() => {
            // SAFETY: `err` is a value of this env.
            unsafe { napi_throw(env.0, err) };
        }
        // Building the error threw: that exception is pending and is what JS sees.
        _ if env.exception_pending() => {}
        // Nothing pending either: returning without a throw would look like success (undefined).
        _ => throw(env, Failure::Pending),
    }
}

/// Builds (does not throw) the JS error for a failure.
pub fn to_js(env: Env, failure: &Failure) -> JsResult<Value> {
    let props = env.object()?;
    let (message, class) = match failure {
        Failure::Loop(e) => {
            env.set(props, "code", env.string(&e.code())?)?;
            env.set(props, "errno", env.int(-(e.errno as i64))?)?;
            env.set(props, "syscall", env.string(e.syscall)?)?;
            if let Some(ioctl) = e.ioctl {
                env.set(props, "ioctl", env.string(ioctl)?)?;
            }
            if let Some(path) = &e.path {
                env.set(props, "path", env.string(&path.to_string_lossy())?)?;
            }
            let mut class = classes(env).map(|c| c.loop_error);
            if let loopdev::Kind::UnexpectedDevice { expected_minor, rdev, mode } = e.kind {
                env.set(props, "expectedMinor", env.int(i64::from(expected_minor))?)?;
                env.set(props, "rdev", env.bigint(rdev)?)?;
                env.set(props, "mode", env.int(i64::from(mode))?)?;
                class = classes(env).map(|c| c.unexpected_device);
            }
            if let loopdev::Kind::ConfigMismatch { differences } = &e.kind {
                env.set(props, "differences", env.array(differences, |d| env.string(d))?)?;
            }
            (e.to_string(), class)
        }
        Failure::Closed(what) => {
            env.set(props, "code", env.string("ERR_LOOP_CLOSED")?)?;
            (format!("ERR_LOOP_CLOSED: {what} is closed"), classes(env).map(|c| c.loop_error))
        }
        Failure::Type(msg) => return plain(env, napi_create_type_error, "ERR_INVALID_ARG_TYPE", msg),
        Failure::Internal(msg) => return plain(env, napi_create_error, "ERR_LOOP_INTERNAL", msg),
        Failure::Range(msg) => return plain(env, napi_create_range_error, "ERR_OUT_OF_RANGE", msg),
        Failure::Pending => return env.undefined(),
        Failure::Thrown(t) => return env.thrown_value(t),
    };
    let message = env.string(&message)?;
    match class {
        Some(r) => env.new_instance(env.deref(r)?, &[message, props]),
        // Before init (or if it was never called): a plain Error with the same fields.
        None => {
            let err = plain(env, napi_create_error, "", "")?;
            env.set(err, "message", message)?;
            for key in ["code", "errno", "syscall", "ioctl", "path", "differences"] {
                if let Some(v) = env.opt(props, key)? {
                    env.set(err, key, v)?;
                }
            }
            Ok(err)
        }
    }
}

/// A failure as a value to reject a promise with, never nothing: the failure's own error, else the exception
/// pending (building the error can throw, e.g. a registered class whose constructor throws), else a plain
/// Error saying an N-API call failed.
pub fn rejection(env: Env, failure: Failure) -> Value {
    if !matches!(failure, Failure::Pending) {
        if let Ok(err) = to_js(env, &failure) {
            if !err.is_null() && !env.exception_pending() {
                return err;
            }
        }
    }
    if env.exception_pending() {
        if let Ok(err) = env.take_exception_value() {
            return err;
        }
    }
    plain(env, napi_create_error, "", "N-API call failed").or_else(|_| env.undefined()).unwrap_or(ptr::null_mut())
}

type CreateError = unsafe extern "C" fn(napi_env, napi_value, napi_value, *mut napi_value) -> napi_status;

fn plain(env: Env, create: CreateError, code: &str, msg: &str) -> JsResult<Value> {
    let code = if code.is_empty() { ptr::null_mut() } else { env.string(code)? };
    let msg = env.string(msg)?;
    let mut err = ptr::null_mut();
    // SAFETY: valid env, values and out-pointer.
    if unsafe { create(env.0, code, msg, &mut err) } != NAPI_OK {
        return Err(Failure::Pending);
    }
    Ok(err)
}
