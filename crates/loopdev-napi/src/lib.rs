//! N-API binding of the `loopdev` crate. Conversion only: every export reads JS arguments, calls the core,
//! and converts the result or error back. Raw N-API lives in `sys`; the rest uses the helpers in `js`.

// Inner `unsafe` blocks in unsafe fns are the style on current compilers but redundant on Debian's 1.63.
#![allow(unused_unsafe)]

mod control;
mod convert;
mod device;
mod entry;
mod errors;
mod handle;
mod js;
mod openers;
mod partitions;
mod remote;
mod sys;
mod task;

use entry::Exported;
use js::{Env, Value};

const EXPORTS: &[(&str, Exported)] = &[
    ("init", errors::init),
    ("close", device::close),
    ("closeAsync", device::close_async),
    ("loopDisposeAsync", device::dispose_async),
    ("controlOpen", control::open),
    ("controlAdd", control::add),
    ("controlRemove", control::remove),
    ("controlGetUnbound", control::get_unbound),
    ("controlLoopForFd", control::loop_for_fd),
    ("controlLoopForFdAsync", control::loop_for_fd_async),
    ("attach", control::attach),
    ("attachAsync", control::attach_async),
    ("loopOpen", device::open),
    ("loopFlock", device::flock),
    ("loopFlushBuf", device::flush_buf),
    ("loopSetFd", device::set_fd),
    ("loopClearFd", device::clear_fd),
    ("loopClearFdWait", device::clear_fd_wait),
    ("loopClearFdWaitAsync", device::clear_fd_wait_async),
    ("loopDetach", device::detach),
    ("loopDetachAsync", device::detach_async),
    ("loopChangeFd", device::change_fd),
    ("loopIsBoundTo", device::is_bound_to),
    ("loopSetStatus", device::set_status),
    ("loopGetStatus", device::get_status),
    ("loopConfigure", device::configure),
    ("loopConfigureAsync", device::configure_async),
    ("loopSetDirectIo", device::set_direct_io),
    ("loopSetBlockSize", device::set_block_size),
    ("loopSetCapacity", device::set_capacity),
    ("loopMknod", device::mknod),
    ("removeNode", device::remove_node),
    ("blockOpeners", openers::block_openers),
    ("blockOpenersAsync", openers::block_openers_async),
    ("loopPartitionTable", partitions::table),
    ("loopAddPartitions", partitions::add),
    ("loopRemovePartition", partitions::remove),
    ("remoteServerListen", remote::server_listen),
    ("remoteServerAdopt", remote::server_adopt),
    ("remoteServerClose", remote::server_close),
    ("remoteServerStats", remote::server_stats),
    ("remoteClientConnect", remote::client_connect),
    ("remoteClientRequest", remote::client_request),
    ("remoteClientCancel", remote::client_cancel),
    ("remoteClientClose", remote::client_close),
];

/// Entry point node looks up when it loads the addon.
///
/// # Safety
/// Called by node with a live env and its exports object.
#[no_mangle]
pub unsafe extern "C" fn napi_register_module_v1(env: sys::napi_env, exports: Value) -> Value {
    let env = Env(env);
    for (name, f) in EXPORTS {
        if entry::export(env, exports, name, *f).is_err() {
            break;
        }
    }
    exports
}
