//! Native objects held by JS as externals. close() drops JS's reference at once; a blocking call still
//! running on the pool keeps its own `Arc`, so the fd is closed after it, never under it.

use crate::js::{Env, Failure, JsResult, Value};
use loopdev::{Loop, LoopControl};
use std::sync::{Arc, Mutex};

pub struct Handle<T>(Mutex<Option<Arc<T>>>);

pub enum Resource {
    Control(Handle<LoopControl>),
    Loop(Handle<Loop>),
}

impl<T> Handle<T> {
    pub fn new(value: T) -> Self {
        Handle(Mutex::new(Some(Arc::new(value))))
    }
    fn get(&self, what: &'static str) -> JsResult<Arc<T>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone().ok_or(Failure::Closed(what))
    }
    /// Whether this call closed it (false when it was closed already).
    fn close(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take().is_some()
    }
}

fn resource<'a>(env: Env, v: Value) -> JsResult<&'a Resource> {
    env.external_ref::<Resource>(v)
}

pub fn control(env: Env, v: Value) -> JsResult<Arc<LoopControl>> {
    match resource(env, v)? {
        Resource::Control(h) => h.get("loop-control"),
        Resource::Loop(_) => Err(Failure::Type("expected a LoopControl handle".into())),
    }
}

pub fn lo(env: Env, v: Value) -> JsResult<Arc<Loop>> {
    match resource(env, v)? {
        Resource::Loop(h) => h.get("loop device"),
        Resource::Control(_) => Err(Failure::Type("expected a Loop handle".into())),
    }
}

/// Closes either kind of handle; idempotent. True when this call closed it.
pub fn close(env: Env, v: Value) -> JsResult<bool> {
    Ok(match resource(env, v)? {
        Resource::Control(h) => h.close(),
        Resource::Loop(h) => h.close(),
    })
}
