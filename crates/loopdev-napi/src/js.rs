//! Safe helpers over the raw declarations in `sys`: JS values in and out, argument checks, throwing.

use crate::sys::*;
use std::ffi::c_void;
use std::ptr;

pub type Value = napi_value;

/// Why a call failed, before it becomes a JS exception.
#[derive(Debug)]
pub enum Failure {
    Loop(loopdev::Error),
    /// A handle used after close(): `ERR_LOOP_CLOSED`.
    Closed(&'static str),
    Type(String),
    /// Not the caller's doing: a panic, cancelled work, a callback that could not run (`ERR_LOOP_INTERNAL`).
    Internal(String),
    Range(String),
    /// A JS exception is already pending (thrown by a callback, or by N-API itself).
    Pending,
    /// A value a JS callback threw while we were off the JS thread; rethrown when the promise settles.
    Thrown(Thrown),
}

/// A reference to a thrown JS value, carried across threads but only touched on the JS thread.
#[derive(Debug)]
pub struct Thrown(pub napi_ref);

// SAFETY: the reference is created and dereferenced only on the JS thread (call_js / complete); worker
// threads merely move it along.
unsafe impl Send for Thrown {}

impl From<loopdev::Error> for Failure {
    fn from(e: loopdev::Error) -> Self {
        Failure::Loop(e)
    }
}

pub type JsResult<T> = Result<T, Failure>;

#[derive(Clone, Copy)]
pub struct Env(pub napi_env);

fn check(status: napi_status) -> JsResult<()> {
    if status == NAPI_OK {
        Ok(())
    } else {
        Err(Failure::Pending)
    }
}

macro_rules! out {
    ($env:expr, $f:ident ( $($arg:expr),* )) => {{
        let mut result = std::mem::MaybeUninit::uninit();
        // SAFETY: `env` is the live env of this call and `result` is a valid out-pointer.
        check(unsafe { $f($env.0, $($arg,)* result.as_mut_ptr()) })?;
        // SAFETY: N-API wrote the result because it returned napi_ok.
        unsafe { result.assume_init() }
    }};
}

impl Env {
    pub fn undefined(self) -> JsResult<Value> {
        Ok(out!(self, napi_get_undefined()))
    }
    pub fn boolean(self, b: bool) -> JsResult<Value> {
        Ok(out!(self, napi_get_boolean(b)))
    }
    pub fn int(self, n: i64) -> JsResult<Value> {
        Ok(out!(self, napi_create_int64(n)))
    }
    pub fn bigint(self, n: u64) -> JsResult<Value> {
        Ok(out!(self, napi_create_bigint_uint64(n)))
    }
    pub fn string(self, s: &str) -> JsResult<Value> {
        Ok(out!(self, napi_create_string_utf8(s.as_ptr().cast(), s.len())))
    }
    pub fn null(self) -> JsResult<Value> {
        Ok(out!(self, napi_get_null()))
    }
    /// A JS array of `items`, each converted by `f`.
    pub fn array<T>(self, items: &[T], f: impl Fn(&T) -> JsResult<Value>) -> JsResult<Value> {
        let arr = out!(self, napi_create_array_with_length(items.len()));
        for (i, item) in items.iter().enumerate() {
            let v = f(item)?;
            // SAFETY: both values belong to this env's current scope.
            check(unsafe { napi_set_element(self.0, arr, i as u32, v) })?;
        }
        Ok(arr)
    }
    pub fn object(self) -> JsResult<Value> {
        Ok(out!(self, napi_create_object()))
    }

    pub fn set(self, obj: Value, name: &str, value: Value) -> JsResult<()> {
        let key = self.string(name)?;
        // SAFETY: all values belong to this env's current scope.
        check(unsafe { napi_set_property(self.0, obj, key, value) })
    }

    pub fn get(self, obj: Value, name: &str) -> JsResult<Value> {
        let key = self.string(name)?;
        Ok(out!(self, napi_get_property(obj, key)))
    }

    pub fn is_array(self, v: Value) -> JsResult<bool> {
        Ok(out!(self, napi_is_array(v)))
    }

    pub fn array_length(self, arr: Value) -> JsResult<u32> {
        Ok(out!(self, napi_get_array_length(arr)))
    }

    /// `arr[i]` (undefined past the end).
    pub fn element(self, arr: Value, i: u32) -> JsResult<Value> {
        Ok(out!(self, napi_get_element(arr, i)))
    }

    pub fn type_of(self, v: Value) -> JsResult<napi_valuetype> {
        Ok(out!(self, napi_typeof(v)))
    }

    pub fn is_nullish(self, v: Value) -> JsResult<bool> {
        Ok(matches!(self.type_of(v)?, NAPI_UNDEFINED | NAPI_NULL))
    }

    pub fn to_bool(self, v: Value) -> JsResult<bool> {
        if self.type_of(v)? != NAPI_BOOLEAN {
            return Err(Failure::Type("expected a boolean".into()));
        }
        Ok(out!(self, napi_get_value_bool(v)))
    }

    pub fn to_f64(self, v: Value, what: &str) -> JsResult<f64> {
        if self.type_of(v)? != NAPI_NUMBER {
            return Err(Failure::Type(format!("{what} must be a number")));
        }
        Ok(out!(self, napi_get_value_double(v)))
    }

    /// An integer number in `min..=max`; anything else is a RangeError naming `what`, worded as Node's own
    /// ERR_OUT_OF_RANGE (as the TypeScript checks word theirs).
    pub fn to_int(self, v: Value, what: &str, min: i64, max: i64) -> JsResult<i64> {
        let f = self.to_f64(v, what)?;
        if f.fract() != 0.0 || f.is_nan() || f < min as f64 || f > max as f64 {
            return Err(Failure::Range(format!(
                "The value of \"{what}\" is out of range. It must be an integer >= {min} && <= {max}. Received {f}"
            )));
        }
        Ok(f as i64)
    }

    /// A byte size or offset: a non-negative integer number or a bigint up to 2^64-1.
    pub fn to_u64(self, v: Value, what: &str) -> JsResult<u64> {
        if self.type_of(v)? == NAPI_BIGINT {
            let (mut n, mut lossless) = (0u64, false);
            // SAFETY: valid env, value and out-pointers.
            check(unsafe { napi_get_value_bigint_uint64(self.0, v, &mut n, &mut lossless) })?;
            if !lossless {
                return Err(Failure::Range(format!(
                    "The value of \"{what}\" is out of range. It must be >= 0n && <= 2n ** 64n - 1n"
                )));
            }
            return Ok(n);
        }
        let f = self.to_f64(v, what)?;
        // 2^64 itself is representable as f64 and must be refused, hence the half-open range.
        if f.fract() != 0.0 || f.is_nan() || !(0.0..18_446_744_073_709_551_616.0).contains(&f) {
            return Err(Failure::Range(format!(
                "The value of \"{what}\" is out of range. It must be an integer >= 0 && <= 2^64-1. Received {f}"
            )));
        }
        Ok(f as u64)
    }

    pub fn to_string(self, v: Value) -> JsResult<String> {
        if self.type_of(v)? != NAPI_STRING {
            return Err(Failure::Type("expected a string".into()));
        }
        let len = out!(self, napi_get_value_string_utf8(v, ptr::null_mut(), 0));
        let mut buf = vec![0u8; len + 1];
        let written = out!(self, napi_get_value_string_utf8(v, buf.as_mut_ptr().cast(), buf.len()));
        buf.truncate(written);
        String::from_utf8(buf).map_err(|_| Failure::Type("invalid UTF-8".into()))
    }

    /// `obj[name]` when present and not undefined/null.
    pub fn opt(self, obj: Value, name: &str) -> JsResult<Option<Value>> {
        if self.is_nullish(obj)? {
            return Ok(None);
        }
        let v = self.get(obj, name)?;
        Ok(if self.is_nullish(v)? { None } else { Some(v) })
    }

    pub fn opt_bool(self, obj: Value, name: &str) -> JsResult<Option<bool>> {
        self.opt(obj, name)?
            .map(|v| self.to_bool(v).map_err(|_| Failure::Type(format!("{name} must be a boolean"))))
            .transpose()
    }

    pub fn opt_u64(self, obj: Value, name: &str) -> JsResult<Option<u64>> {
        self.opt(obj, name)?.map(|v| self.to_u64(v, name)).transpose()
    }

    pub fn call(self, func: Value, args: &[Value]) -> JsResult<Value> {
        let recv = self.undefined()?;
        Ok(out!(self, napi_call_function(recv, func, args.len(), args.as_ptr())))
    }

    pub fn new_instance(self, ctor: Value, args: &[Value]) -> JsResult<Value> {
        Ok(out!(self, napi_new_instance(ctor, args.len(), args.as_ptr())))
    }

    pub fn external<T: Native>(self, value: T) -> JsResult<Value> {
        unsafe extern "C" fn drop_box<T>(_env: napi_env, data: *mut c_void, _hint: *mut c_void) {
            // SAFETY: `data` is the Box<T> leaked below; the finalizer runs exactly once.
            no_unwind(|| drop(unsafe { Box::from_raw(data.cast::<T>()) }));
        }
        let data = Box::into_raw(Box::new(value)).cast::<c_void>();
        let mut v = ptr::null_mut();
        // SAFETY: valid env and out-pointer; on success the finalizer owns `data`.
        if unsafe { napi_create_external(self.0, data, Some(drop_box::<T>), ptr::null_mut(), &mut v) } != NAPI_OK {
            // SAFETY: no external was made, so no finalizer will run: the box is still ours alone.
            drop(unsafe { Box::from_raw(data.cast::<T>()) });
            return Err(Failure::Pending);
        }
        // Untagged, the external is refused by external_ref and its finalizer still frees the box.
        // SAFETY: valid env and value; N-API copies the tag.
        check(unsafe { napi_type_tag_object(self.0, v, &T::TAG) })?;
        Ok(v)
    }

    /// The T inside an external made by `external::<T>`; any other value (a handle of another kind, another
    /// addon's external, a plain object) is a TypeError saying an `expected` handle was wanted.
    pub fn external_ref<'a, T: Native>(self, v: Value, expected: &str) -> JsResult<&'a T> {
        let wrong = || Failure::Type(format!("expected a {expected} handle"));
        if self.type_of(v)? != NAPI_EXTERNAL {
            return Err(wrong());
        }
        // The tag is the only proof of what the pointer inside points to: check it before the cast.
        if !out!(self, napi_check_object_type_tag(v, &T::TAG)) {
            return Err(wrong());
        }
        let data: *mut c_void = out!(self, napi_get_value_external(v));
        // SAFETY: tagged with T::TAG, so made by external::<T>; the external keeps the box alive while JS
        // holds the value we were passed.
        Ok(unsafe { &*data.cast::<T>() })
    }

    pub fn reference(self, v: Value) -> JsResult<napi_ref> {
        Ok(out!(self, napi_create_reference(v, 1)))
    }

    /// Takes the pending exception (if any) out of the env so it can be rethrown later.
    pub fn take_exception(self) -> JsResult<Thrown> {
        let e = out!(self, napi_get_and_clear_last_exception());
        Ok(Thrown(self.reference(e)?))
    }

    /// Takes the pending exception (undefined if none) out of the env.
    pub fn take_exception_value(self) -> JsResult<Value> {
        Ok(out!(self, napi_get_and_clear_last_exception()))
    }

    /// A JS function named `name` that calls `cb` with `data`.
    pub fn function(self, name: &str, cb: napi_callback, data: *mut c_void) -> JsResult<Value> {
        Ok(out!(self, napi_create_function(name.as_ptr().cast(), name.len(), cb, data)))
    }

    /// The value behind a `Thrown`, releasing the reference.
    pub fn thrown_value(self, t: &Thrown) -> JsResult<Value> {
        let v = self.deref(t.0)?;
        // SAFETY: the reference belongs to this env and is not used again.
        unsafe { napi_delete_reference(self.0, t.0) };
        Ok(v)
    }

    pub fn deref(self, r: napi_ref) -> JsResult<Value> {
        Ok(out!(self, napi_get_reference_value(r)))
    }

    pub fn exception_pending(self) -> bool {
        let mut pending = false;
        // SAFETY: valid env and out-pointer.
        unsafe { napi_is_exception_pending(self.0, &mut pending) };
        pending
    }
}

/// A Rust type JS holds as an external. `TAG` (unique per type) marks the externals that hold one.
pub trait Native: 'static {
    const TAG: napi_type_tag;
}

/// Runs `f` in a callback called from C (finalizers, async completion, threadsafe calls), where unwinding
/// is undefined behaviour: a panic stops here, already reported by the panic hook.
pub fn no_unwind(f: impl FnOnce()) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
}

/// The i-th argument, or `undefined` when the caller passed fewer.
pub fn arg(env: Env, args: &[Value], i: usize) -> JsResult<Value> {
    match args.get(i) {
        Some(v) => Ok(*v),
        None => env.undefined(),
    }
}
