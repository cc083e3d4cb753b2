//! The one C entry point of every exported function: reads the arguments, calls the Rust function, and
//! turns its failure (or panic) into a thrown exception.

use crate::errors::throw;
use crate::js::{Env, Failure, JsResult, Value};
use crate::sys::*;
use std::ffi::c_void;
use std::ptr;

pub type Exported = fn(Env, &[Value]) -> JsResult<Value>;

/// The one C entry point of every exported function; the Rust function rides in the callback's data.
/// Reads up to 12 arguments, turns a Failure into a thrown exception, never unwinds into C.
unsafe extern "C" fn trampoline(env: napi_env, info: napi_callback_info) -> napi_value {
    let env = Env(env);
    let mut argv = [ptr::null_mut(); 12];
    let mut argc = argv.len();
    let mut data: *mut c_void = ptr::null_mut();
    // SAFETY: argv has room for argc values; `this` is not requested.
    if unsafe { napi_get_cb_info(env.0, info, &mut argc, argv.as_mut_ptr(), ptr::null_mut(), &mut data) } != NAPI_OK {
        return ptr::null_mut();
    }
    // SAFETY: `data` is the Exported fn pointer stored by `export`.
    let f: Exported = unsafe { std::mem::transmute::<*mut c_void, Exported>(data) };
    let args = &argv[..argc.min(argv.len())];
    match std::panic::catch_unwind(|| f(env, args)) {
        Ok(Ok(v)) => v,
        Ok(Err(failure)) => {
            throw(env, failure);
            ptr::null_mut()
        }
        Err(_) => {
            throw(env, Failure::Internal("internal error (panic) in loopdev native code".into()));
            ptr::null_mut()
        }
    }
}

/// `exports[name] = f`.
pub fn export(env: Env, exports: Value, name: &str, f: Exported) -> JsResult<()> {
    let func = env.function(name, Some(trampoline), f as *mut c_void)?;
    env.set(exports, name, func)
}
