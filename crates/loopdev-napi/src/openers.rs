//! Exports for naming the processes that hold a device open: the scan of /proc, blocking or on the pool.

use crate::js::{arg, Env, Failure, JsResult, Value};
use loopdev::openers::{openers, Opener};

/// `devs`: an array of `"major:minor"` strings, as sysfs `dev` has them.
fn devs(env: Env, v: Value) -> JsResult<Vec<u64>> {
    if !env.is_array(v)? {
        return Err(Failure::Type("devs: expected an array of 'major:minor' strings".into()));
    }
    (0..env.array_length(v)?)
        .map(|i| {
            let s = env.to_string(env.element(v, i)?)?;
            let parsed = s.split_once(':').and_then(|(major, minor)| Some((major.parse().ok()?, minor.parse().ok()?)));
            let (major, minor) =
                parsed.ok_or_else(|| Failure::Type(format!("devs[{i}]: expected 'major:minor', got '{s}'")))?;
            Ok(nix::sys::stat::makedev(major, minor))
        })
        .collect()
}

/// `[{ pid, comm }]`
fn value(env: Env, found: Vec<Opener>) -> JsResult<Value> {
    env.array(&found, |o| {
        let x = env.object()?;
        env.set(x, "pid", env.int(i64::from(o.pid))?)?;
        env.set(x, "comm", env.string(&o.comm)?)?;
        Ok(x)
    })
}

/// blockOpeners(devs) → [{ pid, comm }]
pub fn block_openers(env: Env, args: &[Value]) -> JsResult<Value> {
    let devs = devs(env, arg(env, args, 0)?)?;
    value(env, openers(&devs))
}

/// blockOpenersAsync(devs) → Promise<[{ pid, comm }]>
pub fn block_openers_async(env: Env, args: &[Value]) -> JsResult<Value> {
    let devs = devs(env, arg(env, args, 0)?)?;
    crate::task::spawn(env, "loopdev.blockOpeners", move || Ok(openers(&devs)), value)
}
