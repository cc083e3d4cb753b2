/** Which loop devices are bound to a file, from sysfs: shared by the tests and the benchmarks (no ava here). */
import * as fs from 'node:fs';

/** Loop devices whose backing file is `file` or lies under `file` (a directory), from sysfs. */
export function devicesBoundUnder(file: string): string[] {
  const found: string[] = [];
  for (const name of fs.readdirSync('/sys/block')) {
    if (!name.startsWith('loop')) continue;
    let backing: string;
    try {
      backing = fs.readFileSync(`/sys/block/${name}/loop/backing_file`, 'utf8').trim();
    } catch {
      continue; // unbound
    }
    backing = backing.replace(/ \(deleted\)$/, '');
    if (backing === file || backing.startsWith(file + '/')) found.push(`/dev/${name}`);
  }
  return found;
}
