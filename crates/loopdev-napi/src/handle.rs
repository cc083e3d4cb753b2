//! Native objects held by JS as externals. close() drops JS's reference at once; a blocking call still
//! running on the pool keeps its own `Arc`, so the fd is closed after it, never under it.

use crate::js::{Env, Failure, JsResult, Native, Value};
use crate::sys::napi_type_tag;
use loopdev::{Loop, LoopControl};
use std::sync::{Arc, Mutex};

pub struct Handle<T>(Mutex<Option<Arc<T>>>);

pub enum Resource {
    Control(Handle<LoopControl>),
    Loop(Handle<Loop>),
}

impl Native for Resource {
    const TAG: napi_type_tag = napi_type_tag { lower: 0xefbf_96e4_29c5_87cb, upper: 0x5979_d21d_e193_8e09 };
}

impl<T> Handle<T> {
    pub fn new(value: T) -> Self {
        Handle(Mutex::new(Some(Arc::new(value))))
    }
    fn get(&self, what: &'static str) -> JsResult<Arc<T>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone().ok_or(Failure::Closed(what))
    }
    /// JS's reference, taken: the handle reads as closed from now on (None when it was closed already).
    fn take(&self) -> Option<Arc<T>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

pub fn control(env: Env, v: Value) -> JsResult<Arc<LoopControl>> {
    const WHAT: &str = "LoopControl";
    match env.external_ref::<Resource>(v, WHAT)? {
        Resource::Control(h) => h.get("loop-control"),
        Resource::Loop(_) => Err(Failure::Type(format!("expected a {WHAT} handle"))),
    }
}

pub fn lo(env: Env, v: Value) -> JsResult<Arc<Loop>> {
    const WHAT: &str = "Loop";
    match env.external_ref::<Resource>(v, WHAT)? {
        Resource::Loop(h) => h.get("loop device"),
        Resource::Control(_) => Err(Failure::Type(format!("expected a {WHAT} handle"))),
    }
}

/// JS's reference to a Loop, taken out of its handle (None when it was closed already).
pub fn take_loop(env: Env, v: Value) -> JsResult<Option<Arc<Loop>>> {
    const WHAT: &str = "Loop";
    match env.external_ref::<Resource>(v, WHAT)? {
        Resource::Loop(h) => Ok(h.take()),
        Resource::Control(_) => Err(Failure::Type(format!("expected a {WHAT} handle"))),
    }
}

/// What JS held of either kind of handle, taken out of it (None when it was closed already): dropping it
/// closes the fd, unless a blocking call still running holds its own reference.
pub fn take(env: Env, v: Value) -> JsResult<Option<Box<dyn Send>>> {
    Ok(match env.external_ref::<Resource>(v, "Loop or LoopControl")? {
        Resource::Control(h) => h.take().map(|a| Box::new(a) as Box<dyn Send>),
        Resource::Loop(h) => h.take().map(|a| Box::new(a) as Box<dyn Send>),
    })
}
