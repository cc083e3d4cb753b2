//! Exports for the osbuild-compatible remote loop server and client. The server runs on its own Rust
//! thread (see `loopdev::remote::server`); JS only starts it, reads its counters and stops it. The stop
//! waits for that thread (seconds, if a request is stuck), so it never runs on the JS thread: remoteServerClose
//! runs it as async work, and a handle collected without close() hands it to a thread of its own. A client
//! request blocks until the reply, so it runs on the client's own request thread.

use crate::convert;
use crate::js::{arg, no_unwind, Env, Failure, JsResult, Native, Value};
use crate::sys::*;
use crate::task::JobThread;
use loopdev::remote::client::Sent;
use loopdev::remote::{Client, Reply, Request, Server, ServerOptions};
use std::cell::Cell;
use std::ffi::c_void;
use std::os::unix::io::{AsFd, IntoRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What a remote handle holds. close() takes the value out; work already running keeps its own `Arc`.
enum Remote {
    Server(ServerSlot),
    Client(ClientSlot),
}

struct ClientSlot {
    client: Mutex<Option<Arc<Client>>>,
    /// Where the requests wait for their replies.
    requests: JobThread,
}

impl ClientSlot {
    fn get(&self) -> Option<Arc<Client>> {
        self.client.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

struct ServerSlot {
    server: Mutex<Option<Server>>,
    /// The env whose teardown hook points at this slot, once registered.
    hooked: Cell<Option<napi_env>>,
}

impl ServerSlot {
    fn take(&self) -> Option<Server> {
        self.server.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Shuts the server down in place when the env is torn down (node runs cleanup hooks before the
    /// finalizers of what is left): a stop handed to a thread then might not finish before the process
    /// exits, leaving the socket file and the nodes made in peers' directories behind.
    fn hook(&self, env: Env) -> JsResult<()> {
        // SAFETY: the slot lives in the external's box, which outlives the hook: Drop removes it first.
        let status = unsafe { napi_add_env_cleanup_hook(env.0, Some(stop_at_teardown), self.arg()) };
        if status != NAPI_OK {
            return Err(Failure::Pending);
        }
        self.hooked.set(Some(env.0));
        Ok(())
    }

    fn arg(&self) -> *mut c_void {
        self as *const ServerSlot as *mut c_void
    }
}

unsafe extern "C" fn stop_at_teardown(arg: *mut c_void) {
    // SAFETY: `arg` is a live ServerSlot (see `hook`); the JS thread is the only one touching it.
    no_unwind(|| drop(unsafe { &*arg.cast::<ServerSlot>() }.take()));
}

/// Runs when the handle is collected, on the JS thread: the stop goes to a thread of its own.
impl Drop for ServerSlot {
    fn drop(&mut self) {
        if let Some(env) = self.hooked.get() {
            // SAFETY: the env is alive while its finalizers run; a hook that ran already is not found.
            unsafe { napi_remove_env_cleanup_hook(env, Some(stop_at_teardown), self.arg()) };
        }
        if let Some(server) = self.take() {
            // Without a thread the closure, and the server with it, is dropped right here: better to block
            // than to leave the server running with no handle to stop it.
            let _ = std::thread::Builder::new().name("loopdev-srv-stop".into()).spawn(move || drop(server));
        }
    }
}

impl Native for Remote {
    const TAG: napi_type_tag = napi_type_tag { lower: 0xb2ad_6cc5_d9c5_3973, upper: 0x28d3_774a_472d_7d41 };
}

fn server_slot<'a>(env: Env, args: &[Value]) -> JsResult<&'a ServerSlot> {
    const WHAT: &str = "LoopServer";
    match env.external_ref::<Remote>(arg(env, args, 0)?, WHAT)? {
        Remote::Server(s) => Ok(s),
        Remote::Client(_) => Err(Failure::Type(format!("expected a {WHAT} handle"))),
    }
}

fn client_slot<'a>(env: Env, args: &[Value]) -> JsResult<&'a ClientSlot> {
    const WHAT: &str = "LoopClient";
    match env.external_ref::<Remote>(arg(env, args, 0)?, WHAT)? {
        Remote::Client(c) => Ok(c),
        Remote::Server(_) => Err(Failure::Type(format!("expected a {WHAT} handle"))),
    }
}

fn done(env: Env, _: ()) -> JsResult<Value> {
    env.undefined()
}

/// `allowUids`: an array of uids, or nullish for the default (our euid and root).
fn allow_uids(env: Env, v: Value) -> JsResult<Option<Vec<u32>>> {
    if env.is_nullish(v)? {
        return Ok(None);
    }
    let len = env.to_int(env.get(v, "length")?, "allowUids.length", 0, 1 << 16)?;
    (0..len)
        .map(|i| {
            let uid = env.get(v, &i.to_string())?;
            Ok(env.to_int(uid, &format!("allowUids[{i}]"), 0, i64::from(u32::MAX))? as u32)
        })
        .collect::<JsResult<Vec<u32>>>()
        .map(Some)
}

/// `{ maxConnectionsPerUid?, maxDevices?, maxDevicesPerUid?, idleTimeoutMs?, workers?, maxRequestsPerUid?,
/// requestTimeoutMs?, log? }` (nullish: the defaults; a timeout of 0 is none).
fn quotas(env: Env, v: Value, options: &mut ServerOptions) -> JsResult<()> {
    if env.is_nullish(v)? {
        return Ok(());
    }
    let field = |name: &str, min: i64, max: i64| -> JsResult<Option<i64>> {
        let x = env.get(v, name)?;
        if env.is_nullish(x)? {
            return Ok(None);
        }
        env.to_int(x, name, min, max).map(Some)
    };
    if let Some(n) = field("maxConnectionsPerUid", 1, 1 << 20)? {
        options.max_connections_per_uid = n as usize;
    }
    if let Some(n) = field("maxDevices", 1, 1 << 20)? {
        options.max_devices = n as usize;
    }
    if let Some(n) = field("maxDevicesPerUid", 1, 1 << 20)? {
        options.max_devices_per_uid = n as usize;
    }
    if let Some(ms) = field("idleTimeoutMs", 0, i64::from(u32::MAX))? {
        options.idle_timeout = (ms > 0).then(|| Duration::from_millis(ms as u64));
    }
    // One worker is always left to root: with a single one, no other peer would ever be served.
    if let Some(n) = field("workers", 2, 1024)? {
        options.workers = n as usize;
    }
    if let Some(n) = field("maxRequestsPerUid", 1, 1024)? {
        options.max_requests_per_uid = n as usize;
    }
    if let Some(ms) = field("requestTimeoutMs", 0, i64::from(u32::MAX))? {
        options.request_timeout = (ms > 0).then(|| Duration::from_millis(ms as u64));
    }
    if let Some(log) = env.opt_bool(v, "log")? {
        options.log = log;
    }
    Ok(())
}

/// remoteServerListen(socketPath, allowUids?, quotas?) → handle. Binds and listens now (errors throw), then
/// serves on a new thread.
pub fn server_listen(env: Env, args: &[Value]) -> JsResult<Value> {
    let path = env.to_string(arg(env, args, 0)?)?;
    let mut options = ServerOptions::default();
    if let Some(uids) = allow_uids(env, arg(env, args, 1)?)? {
        options.allow_uids = uids;
    }
    quotas(env, arg(env, args, 2)?, &mut options)?;
    server_handle(env, Server::bind(Path::new(&path), options)?)
}

/// The handle JS holds for a running server (stopped at environment exit too: see `ServerSlot::hook`).
fn server_handle(env: Env, server: Server) -> JsResult<Value> {
    let handle =
        env.external(Remote::Server(ServerSlot { server: Mutex::new(Some(server)), hooked: Cell::new(None) }))?;
    if let Remote::Server(slot) = env.external_ref::<Remote>(handle, "LoopServer")? {
        slot.hook(env)?;
    }
    Ok(handle)
}

/// remoteServerAdopt(fd, allowUids?, quotas?) → handle. Serves on a listening socket someone else made
/// (systemd socket activation); a duplicate is taken, so `fd` stays the caller's.
pub fn server_adopt(env: Env, args: &[Value]) -> JsResult<Value> {
    let listener = convert::owned_fd(env, arg(env, args, 0)?, "fd")?;
    let mut options = ServerOptions::default();
    if let Some(uids) = allow_uids(env, arg(env, args, 1)?)? {
        options.allow_uids = uids;
    }
    quotas(env, arg(env, args, 2)?, &mut options)?;
    server_handle(env, Server::adopt(listener, options)?)
}

/// remoteServerClose(h) → Promise<void>: stops the thread, closes every device, removes the socket.
/// Idempotent.
pub fn server_close(env: Env, args: &[Value]) -> JsResult<Value> {
    let server = server_slot(env, args)?.take();
    crate::task::spawn(
        env,
        "loopdev.serverClose",
        move || match server {
            Some(s) => Ok(s.shutdown()?),
            None => Ok(()),
        },
        done,
    )
}

/// remoteServerStats(h) → { running, connections, devices, requests, failures, refused }
pub fn server_stats(env: Env, args: &[Value]) -> JsResult<Value> {
    let stats = match server_slot(env, args)?.server.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        Some(s) => s.stats(),
        None => return Err(Failure::Closed("loop server")),
    };
    let o = env.object()?;
    env.set(o, "running", env.boolean(stats.running)?)?;
    env.set(o, "connections", env.int(stats.connections as i64)?)?;
    env.set(o, "devices", env.int(stats.devices as i64)?)?;
    env.set(o, "requests", env.int(stats.requests as i64)?)?;
    env.set(o, "failures", env.int(stats.failures as i64)?)?;
    env.set(o, "refused", env.int(stats.refused as i64)?)?;
    Ok(o)
}

/// remoteClientConnect(socketPath) → handle
pub fn client_connect(env: Env, args: &[Value]) -> JsResult<Value> {
    let path = env.to_string(arg(env, args, 0)?)?;
    let client = Client::connect(Path::new(&path))?;
    let requests = JobThread::new("loopdev.remoteRequest");
    env.external(Remote::Client(ClientSlot { client: Mutex::new(Some(Arc::new(client))), requests }))
}

/// `{ offset?, sizeLimit?, lock?, partscan?, readOnly?, sectorSize?, open? }` → the wire request.
fn request(env: Env, o: Value) -> JsResult<Request> {
    Ok(Request {
        offset: env.opt_u64(o, "offset")?,
        sizelimit: env.opt_u64(o, "sizeLimit")?,
        lock: env.opt_bool(o, "lock")?.unwrap_or(false),
        want_fd: env.opt_bool(o, "open")?.unwrap_or(false),
        partscan: env.opt_bool(o, "partscan")?.unwrap_or(false),
        read_only: env.opt_bool(o, "readOnly")?.unwrap_or(false),
        sector_size: match env.opt(o, "sectorSize")? {
            Some(v) => convert::u32_size(env, v, "sectorSize")?,
            None => loopdev::remote::wire::DEFAULT_SECTOR_SIZE,
        },
        ..Request::default()
    })
}

/// `{ devname }` or `{ exception: { type, value, traceback } }`; the TS layer turns the latter into an error.
/// …plus `fd` when the server sent an open fd of the device (JS owns it from here).
fn reply(env: Env, (r, fd): (Reply, Option<OwnedFd>)) -> JsResult<Value> {
    let o = env.object()?;
    if let Some(fd) = fd {
        env.set(o, "fd", env.int(i64::from(fd.into_raw_fd()))?)?;
    }
    match r {
        Reply::Device(name) => env.set(o, "devname", env.string(&name)?)?,
        Reply::Exception(e) => {
            let x = env.object()?;
            env.set(x, "type", env.string(&e.kind)?)?;
            env.set(x, "value", env.string(&e.value)?)?;
            env.set(x, "traceback", env.string(&e.traceback)?)?;
            if let Some(errno) = e.errno() {
                env.set(x, "errno", env.int(i64::from(errno))?)?;
            }
            env.set(o, "exception", x)?;
        }
    }
    Ok(o)
}

/// remoteClientRequest(h, file, dir, options, timeoutMs?) → Promise<reply>. `file` and `dir` are paths,
/// opened on the request's thread, or fds, duplicated before this returns so the caller may close them at
/// once. It waits for the server on the client's request thread, never on the libuv pool: a server that does not
/// answer must not starve the application's fs, dns, crypto and zlib work. ETIMEDOUT after `timeoutMs`;
/// ECANCELED on `remoteClientCancel`.
pub fn client_request(env: Env, args: &[Value]) -> JsResult<Value> {
    let slot = client_slot(env, args)?;
    let client = slot.get().ok_or(Failure::Closed("loop client"))?;
    let req = request(env, arg(env, args, 3)?)?;
    let file = sent(env, arg(env, args, 1)?, "fd", |path| Sent::File(path, req.read_only))?;
    let dir = sent(env, arg(env, args, 2)?, "dirFd", Sent::Dir)?;
    let timeout = arg(env, args, 4)?;
    let timeout = if env.is_nullish(timeout)? {
        None
    } else {
        Some(Duration::from_millis(env.to_int(timeout, "timeoutMs", 0, i64::from(u32::MAX))? as u64))
    };
    slot.requests.run(
        env,
        move || {
            let file = file.open()?;
            Ok(client.request(file.as_fd(), dir.open()?, &req, timeout)?)
        },
        reply,
    )
}

/// A path (opened on the request's thread) or an fd (duplicated now, so the caller may close it at once).
fn sent(env: Env, v: Value, what: &str, path: impl FnOnce(PathBuf) -> Sent) -> JsResult<Sent> {
    if env.type_of(v)? == NAPI_STRING {
        return Ok(path(PathBuf::from(env.to_string(v)?)));
    }
    Ok(Sent::Fd(convert::owned_fd(env, v, what)?))
}

/// remoteClientCancel(h): gives up the request in progress (it rejects with ECANCELED); its late reply is
/// discarded by the next request.
pub fn client_cancel(env: Env, args: &[Value]) -> JsResult<Value> {
    if let Some(client) = client_slot(env, args)?.get() {
        client.cancel();
    }
    env.undefined()
}

/// remoteClientClose(h): shuts the socket down (a pending request fails with ECONNRESET) and drops it.
pub fn client_close(env: Env, args: &[Value]) -> JsResult<Value> {
    let slot = client_slot(env, args)?;
    if let Some(client) = slot.client.lock().unwrap_or_else(|e| e.into_inner()).take() {
        let _ = client.shutdown();
    }
    slot.requests.stop();
    env.undefined()
}
