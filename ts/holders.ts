/**
 * What keeps `loopN` (or one of its partitions) open, as far as can be seen from here, for the errors of a
 * detach that cannot finish: mounts in this mount namespace (`mounted at /mnt`), holders in sysfs (`held by
 * dm-0`), and processes with it open (`open in process 1234 (mkfs.ext4)`). Finding the processes stats every
 * fd of every process (tens of milliseconds on a busy host): the async twin does that on the pool.
 */
import * as fs from 'node:fs';
import { native } from './binding.js';
import type { Op } from './flow.js';
import { partitionNames, readAttr, SYS_BLOCK } from './sysfs.js';

/** Empty when nothing is found (an opener in another mount namespace, or one that has just gone). */
export function holders(name: string): Op<string[]> {
  const devs = [readAttr(name, 'dev'), ...partitionNames(name).map((p) => readAttr(name, `${p}/dev`))].filter(
    (d): d is string => d !== null,
  );
  const named = (openers: { pid: number; comm: string }[]) =>
    openers.map((o) => `open in process ${o.pid} (${o.comm}${o.pid === process.pid ? ', this process' : ''})`);
  return {
    sync: () => [...mountedAt(devs), ...heldBy(name), ...named(native.blockOpeners(devs))],
    async: async () => {
      const seen = [...mountedAt(devs), ...heldBy(name)];
      return [...seen, ...named(await native.blockOpenersAsync(devs))];
    },
  };
}

export function holdersOf(name: string): string[] {
  return holders(name).sync();
}

/** Mount points of `devs` (`major:minor`) in this mount namespace. */
function mountedAt(devs: string[]): string[] {
  let mountinfo = '';
  try {
    mountinfo = fs.readFileSync('/proc/self/mountinfo', 'utf8');
  } catch {
    return []; // no /proc
  }
  const found: string[] = [];
  for (const line of mountinfo.split('\n')) {
    const f = line.split(' ');
    if (f.length > 4 && devs.includes(f[2]!)) {
      found.push(`mounted at ${f[4]!.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)))}`);
    }
  }
  return found;
}

/** sysfs holders (device-mapper, md) of the device and its partitions. */
function heldBy(name: string): string[] {
  const found: string[] = [];
  for (const dir of [name, ...partitionNames(name).map((p) => `${name}/${p}`)]) {
    try {
      for (const h of fs.readdirSync(`${SYS_BLOCK}/${dir}/holders`)) found.push(`held by ${h}`);
    } catch {
      /* none */
    }
  }
  return found;
}
