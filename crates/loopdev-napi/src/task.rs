//! Blocking kernel calls as promises: `run` executes on the libuv pool, `finish` converts on the JS thread.

use crate::js::{no_unwind, Env, Failure, JsResult, Value};
use crate::sys::*;
use std::ffi::c_void;
use std::ptr;

struct Job<T> {
    run: Option<Box<dyn FnOnce() -> JsResult<T> + Send>>,
    output: Option<JsResult<T>>,
    finish: fn(Env, T) -> JsResult<Value>,
    deferred: napi_deferred,
    work: napi_async_work,
}

/// Returns a promise settled with `finish(run())`; `run` must not touch JS.
pub fn spawn<T: Send + 'static>(
    env: Env,
    name: &str,
    run: impl FnOnce() -> JsResult<T> + Send + 'static,
    finish: fn(Env, T) -> JsResult<Value>,
) -> JsResult<Value> {
    let resource_name = env.string(name)?;
    let mut deferred = ptr::null_mut();
    let mut promise = ptr::null_mut();
    // SAFETY: valid env and out-pointers.
    if unsafe { napi_create_promise(env.0, &mut deferred, &mut promise) } != NAPI_OK {
        return Err(Failure::Pending);
    }
    let job = Box::into_raw(Box::new(Job {
        run: Some(Box::new(run)),
        output: None,
        finish,
        deferred,
        work: ptr::null_mut(),
    }));
    // SAFETY: `job` stays alive until `complete` reclaims it; the callbacks match the job's type.
    let status = unsafe {
        let status = napi_create_async_work(
            env.0,
            ptr::null_mut(),
            resource_name,
            Some(execute::<T>),
            Some(complete::<T>),
            job.cast(),
            &mut (*job).work,
        );
        if status != NAPI_OK {
            status
        } else {
            let queued = napi_queue_async_work(env.0, (*job).work);
            if queued != NAPI_OK {
                napi_delete_async_work(env.0, (*job).work);
            }
            queued
        }
    };
    if status != NAPI_OK {
        // SAFETY: the work was not queued, so nothing else will free the job. Dropping it drops `run`, and
        // with it what `run` owns: fds, and a threadsafe function that would keep the event loop alive.
        let job = unsafe { Box::from_raw(job) };
        // The promise exists: reject it (a deferred never settled is never freed) rather than throw.
        settle(env, job.deferred, Err(Failure::Pending));
    }
    Ok(promise)
}

unsafe extern "C" fn execute<T>(_env: napi_env, data: *mut c_void) {
    // SAFETY: `data` is the Job<T> from spawn; only this thread touches it until complete runs.
    let job = unsafe { &mut *data.cast::<Job<T>>() };
    if let Some(run) = job.run.take() {
        job.output = Some(match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
            Ok(result) => result,
            Err(_) => Err(panicked()),
        });
    }
}

unsafe extern "C" fn complete<T>(env: napi_env, status: napi_status, data: *mut c_void) {
    // SAFETY: reclaim the Job leaked in spawn; complete runs exactly once.
    let job = unsafe { Box::from_raw(data.cast::<Job<T>>()) };
    let env = Env(env);
    let Job { output, finish, deferred, work, .. } = *job;
    no_unwind(|| {
        let settled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match output {
            Some(Ok(v)) if status == NAPI_OK => finish(env, v),
            Some(Err(f)) => Err(f),
            _ => Err(Failure::Type("async work was cancelled".into())),
        }));
        settle(env, deferred, settled.unwrap_or_else(|_| Err(panicked())));
    });
    // SAFETY: the work belongs to this env and is deleted exactly once, here.
    unsafe { napi_delete_async_work(env.0, work) };
}

fn panicked() -> Failure {
    Failure::Type("internal error (panic) in loopdev native code".into())
}

/// Resolves or rejects the promise, and never leaves it pending: whoever awaits it would wait forever.
fn settle(env: Env, deferred: napi_deferred, settled: JsResult<Value>) {
    // N-API refuses to settle while an exception is pending (and leaves the promise pending): a pending
    // exception is what went wrong, so it becomes the rejection.
    let settled = match settled {
        Ok(value) if !value.is_null() && !env.exception_pending() => Ok(value),
        Ok(_) => Err(Failure::Pending),
        Err(failure) => Err(failure),
    };
    // SAFETY: the deferred belongs to this env and is settled exactly once, here; the value is never null.
    unsafe {
        match settled {
            Ok(value) => napi_resolve_deferred(env.0, deferred, value),
            Err(failure) => napi_reject_deferred(env.0, deferred, crate::errors::rejection(env, failure)),
        }
    };
}
