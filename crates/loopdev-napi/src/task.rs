//! Blocking kernel calls as promises: `run` executes on the libuv pool (or on a `JobThread`, for waits on
//! something outside the process), `finish` converts on the JS thread.

use crate::js::{no_unwind, Env, Failure, JsResult, Value};
use crate::sys::*;
use std::ffi::c_void;
use std::ptr;
use std::sync::{mpsc, Mutex};

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
    let (deferred, promise) = new_promise(env)?;
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
            _ => Err(Failure::Internal("async work was cancelled".into())),
        }));
        settle(env, deferred, settled.unwrap_or_else(|_| Err(panicked())));
    });
    // SAFETY: the work belongs to this env and is deleted exactly once, here.
    unsafe { napi_delete_async_work(env.0, work) };
}

/// A promise and the deferred that settles it (exactly once: see `settle`).
fn new_promise(env: Env) -> JsResult<(napi_deferred, napi_value)> {
    let mut deferred = ptr::null_mut();
    let mut promise = ptr::null_mut();
    // SAFETY: valid env and out-pointers.
    if unsafe { napi_create_promise(env.0, &mut deferred, &mut promise) } != NAPI_OK {
        return Err(Failure::Pending);
    }
    Ok((deferred, promise))
}

fn panicked() -> Failure {
    Failure::Internal("internal error (panic) in loopdev native code".into())
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

/// A result on its way from a `JobThread` to the JS thread.
struct Delivery<T> {
    output: JsResult<T>,
    finish: fn(Env, T) -> JsResult<Value>,
    deferred: napi_deferred,
}

/// The threadsafe function and the deferred, moved to the thread (both are made to be used from any thread;
/// the deferred is only settled back on the JS thread, in `deliver`).
struct Channel(napi_threadsafe_function, napi_deferred);
// SAFETY: see above.
unsafe impl Send for Channel {}

type ThreadJob = Box<dyn FnOnce() + Send>;

/// A thread of its own for work that waits on something outside the process for as long as that takes (a
/// remote server's reply), which on one of libuv's four pool threads would hold up the application's fs,
/// dns, crypto and zlib work queued behind it. Its jobs run one after another, as a client's requests do
/// anyway; it is started at the first job and kept, because a clone and exit per job cost about 45 µs here.
/// It ends once stopped (or dropped) and its queue is empty.
pub struct JobThread {
    name: &'static str,
    jobs: Mutex<Option<mpsc::Sender<ThreadJob>>>,
}

impl JobThread {
    pub fn new(name: &'static str) -> JobThread {
        JobThread { name, jobs: Mutex::new(None) }
    }

    /// Returns a promise settled with `finish(run())`, `run` having run on this thread after the jobs before
    /// it; `run` must not touch JS.
    pub fn run<T: Send + 'static>(
        &self,
        env: Env,
        run: impl FnOnce() -> JsResult<T> + Send + 'static,
        finish: fn(Env, T) -> JsResult<Value>,
    ) -> JsResult<Value> {
        let resource_name = env.string(self.name)?;
        let (deferred, promise) = new_promise(env)?;
        let mut tsfn = ptr::null_mut();
        // SAFETY: no JS function (deliver settles the promise itself), one thread count, deliver matches the
        // Delivery<T> the job sends. The tsfn keeps the event loop alive until released, like a pending socket.
        let status = unsafe {
            napi_create_threadsafe_function(
                env.0,
                ptr::null_mut(),
                ptr::null_mut(),
                resource_name,
                0,
                1,
                ptr::null_mut(),
                None,
                ptr::null_mut(),
                Some(deliver::<T>),
                &mut tsfn,
            )
        };
        if status != NAPI_OK {
            settle(env, deferred, Err(Failure::Pending));
            return Ok(promise);
        }
        let channel = Channel(tsfn, deferred);
        let job: ThreadJob = Box::new(move || {
            let channel = channel;
            let output =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)).unwrap_or_else(|_| Err(panicked()));
            let delivery = Box::into_raw(Box::new(Delivery { output, finish, deferred: channel.1 }));
            // SAFETY: the tsfn is alive until released below; ownership of `delivery` passes to deliver on
            // success.
            unsafe {
                if napi_call_threadsafe_function(channel.0, delivery.cast(), NAPI_TSFN_BLOCKING) != NAPI_OK {
                    // The environment is closing: its promises go with it.
                    drop(Box::from_raw(delivery));
                }
                napi_release_threadsafe_function(channel.0, NAPI_TSFN_RELEASE);
            }
        });
        if let Err(errno) = self.send(job) {
            // The job (and what `run` owns) is dropped; the tsfn and deferred are still ours.
            // SAFETY: we hold the tsfn's one thread count.
            unsafe { napi_release_threadsafe_function(tsfn, NAPI_TSFN_RELEASE) };
            settle(env, deferred, Err(Failure::Loop(loopdev::Error::os(errno, "pthread_create"))));
        }
        Ok(promise)
    }

    /// Queues the job, starting the thread first if there is none (or it has gone).
    fn send(&self, job: ThreadJob) -> Result<(), nix::errno::Errno> {
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let job = match jobs.as_ref() {
            Some(tx) => match tx.send(job) {
                Ok(()) => return Ok(()),
                Err(mpsc::SendError(job)) => job,
            },
            None => job,
        };
        let (tx, rx) = mpsc::channel::<ThreadJob>();
        std::thread::Builder::new()
            .name(self.name.into())
            .spawn(move || rx.into_iter().for_each(|job| job()))
            .map_err(|e| nix::errno::Errno::from_i32(e.raw_os_error().unwrap_or(nix::libc::EAGAIN)))?;
        tx.send(job).map_err(|_| nix::errno::Errno::EPIPE)?;
        *jobs = Some(tx);
        Ok(())
    }

    /// No more jobs: the thread ends once the queued ones are done.
    pub fn stop(&self) {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

unsafe extern "C" fn deliver<T>(env: napi_env, _func: napi_value, _context: *mut c_void, data: *mut c_void) {
    // SAFETY: `data` is the Delivery<T> boxed by the thread; deliver runs once per call.
    let Delivery { output, finish, deferred } = *unsafe { Box::from_raw(data.cast::<Delivery<T>>()) };
    if env.is_null() {
        return; // the environment is being torn down
    }
    let env = Env(env);
    no_unwind(|| {
        let settled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| output.and_then(|v| finish(env, v))));
        settle(env, deferred, settled.unwrap_or_else(|_| Err(panicked())));
    });
}
