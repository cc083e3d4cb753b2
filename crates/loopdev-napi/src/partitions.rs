//! Exports for partition tables: the table read from the device, and BLKPG registration.

use crate::handle;
use crate::js::{arg, Env, JsResult, Value};
use loopdev::partition::{Detail, Partition, Table};

fn partition(env: Env, p: &Partition) -> JsResult<Value> {
    let o = env.object()?;
    env.set(o, "number", env.int(i64::from(p.number))?)?;
    env.set(o, "start", env.bigint(p.start)?)?;
    env.set(o, "size", env.bigint(p.size)?)?;
    env.set(o, "typeName", p.type_name().map_or_else(|| env.null(), |n| env.string(n))?)?;
    match &p.detail {
        Detail::Gpt { type_guid, uuid, label, attributes } => {
            env.set(o, "typeGuid", env.string(&type_guid.to_string())?)?;
            env.set(o, "uuid", env.string(&uuid.to_string())?)?;
            env.set(o, "label", env.string(label)?)?;
            env.set(o, "attributes", env.bigint(*attributes)?)?;
        }
        Detail::Mbr { type_byte, bootable, extended } => {
            env.set(o, "typeByte", env.int(i64::from(*type_byte))?)?;
            env.set(o, "bootable", env.boolean(*bootable)?)?;
            env.set(o, "extended", env.boolean(*extended)?)?;
        }
    }
    Ok(o)
}

fn strings(env: Env, list: &[String]) -> JsResult<Value> {
    env.array(list, |s| env.string(s))
}

/// `{ scheme, id, blockSize, partitions, warnings }`, or null for a device without a table.
fn table_value(env: Env, t: Option<&Table>) -> JsResult<Value> {
    let t = match t {
        Some(t) => t,
        None => return env.null(),
    };
    let o = env.object()?;
    env.set(o, "scheme", env.string(t.scheme.label())?)?;
    env.set(o, "id", env.string(&t.id)?)?;
    env.set(o, "blockSize", env.int(i64::from(t.sector_size))?)?;
    env.set(o, "partitions", env.array(&t.partitions, |p| partition(env, p))?)?;
    env.set(o, "warnings", strings(env, &t.warnings)?)?;
    Ok(o)
}

/// loopPartitionTable(h) → table | null
pub fn table(env: Env, args: &[Value]) -> JsResult<Value> {
    let t = handle::lo(env, arg(env, args, 0)?)?.partition_table()?;
    table_value(env, t.as_ref())
}

/// loopAddPartitions(h) → { table, added: number[], warnings: string[] }
pub fn add(env: Env, args: &[Value]) -> JsResult<Value> {
    let reg = handle::lo(env, arg(env, args, 0)?)?.add_partitions()?;
    let o = env.object()?;
    env.set(o, "table", table_value(env, reg.table.as_ref())?)?;
    env.set(o, "added", env.array(&reg.added, |n| env.int(i64::from(*n)))?)?;
    env.set(o, "warnings", strings(env, &reg.warnings)?)?;
    Ok(o)
}

/// loopRemovePartition(h, number)
pub fn remove(env: Env, args: &[Value]) -> JsResult<Value> {
    let number = env.to_int(arg(env, args, 1)?, "number", 1, 255)? as u32;
    handle::lo(env, arg(env, args, 0)?)?.remove_partition(number)?;
    env.undefined()
}
