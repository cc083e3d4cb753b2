/**
 * Child of concurrency.test.ts: attaches N files of its own at the same time, checks each device is bound to
 * its own file, detaches them all, `rounds` times. Prints one JSON line (Report) and exits 0 even when some
 * attaches failed (the parent asserts on the report).
 *
 *   node --import tsx attacher.ts '{"files":[...],"rounds":10,"api":"loopForFd"}'
 *
 * api: loopForFd (N concurrent calls sharing one LoopControl), loopForFdSync (sequential in this process,
 * concurrent with the other processes), attach (N concurrent), attachSync (sequential).
 */
import * as fs from 'node:fs';
import { LoopControl, attach, attachSync, type Loop, type LoopDevice } from '../../../ts/index.js';

/** What both APIs return and the check uses. */
type Bound = Loop | LoopDevice;

interface Spec {
  files: string[];
  rounds: number;
  api: 'loopForFd' | 'loopForFdSync' | 'attach' | 'attachSync';
}

export interface Report {
  api: string;
  attached: number;
  detached: number;
  failures: string[];
  misbound: string[];
  minors: number[];
}

const spec = JSON.parse(process.argv[2]!) as Spec;
const report: Report = { api: spec.api, attached: 0, detached: 0, failures: [], misbound: [], minors: [] };
const fds = spec.files.map((f) => fs.openSync(f, 'r+'));
/** One LoopControl for the whole process, shared by the concurrent calls (as an application would). */
const ctl = new LoopControl();

function describe(e: unknown): string {
  const err = e as { code?: string; message?: string };
  return `${err.code ?? 'NO_CODE'}: ${err.message ?? String(e)}`;
}

/** The kernel's view (sysfs) must agree with isBoundTo: the device is bound to exactly this file. */
function check(lo: Bound, i: number): void {
  const file = spec.files[i]!;
  const backing = fs.readFileSync(`/sys/block/${lo.devname}/loop/backing_file`, 'utf8').trim();
  if (!lo.isBoundTo(fds[i]!) || backing !== file) report.misbound.push(`${lo.path}: ${backing}, expected ${file}`);
  report.minors.push(lo.minor);
}

async function attachOne(i: number): Promise<{ lo: Bound; detach: () => Promise<void> } | null> {
  try {
    switch (spec.api) {
      case 'loopForFd': {
        const lo = await ctl.loopForFd(fds[i]!);
        return { lo, detach: () => lo[Symbol.asyncDispose]() };
      }
      case 'loopForFdSync': {
        const lo = ctl.loopForFdSync(fds[i]!);
        return { lo, detach: async () => lo[Symbol.dispose]() };
      }
      case 'attach': {
        const lo = await attach(spec.files[i]!);
        return { lo, detach: () => lo.detach() };
      }
      case 'attachSync': {
        const lo = attachSync(spec.files[i]!);
        return { lo, detach: async () => lo.detachSync() };
      }
    }
  } catch (e) {
    report.failures.push(`attach ${spec.files[i]}: ${describe(e)}`);
    return null;
  }
}

for (let r = 0; r < spec.rounds; r++) {
  const sequential = spec.api === 'loopForFdSync' || spec.api === 'attachSync';
  const bound: Array<{ lo: Bound; detach: () => Promise<void> } | null> = [];
  if (sequential) for (let i = 0; i < fds.length; i++) bound.push(await attachOne(i));
  else bound.push(...(await Promise.all(fds.map((_, i) => attachOne(i)))));
  const minors = bound.flatMap((b) => (b ? [b.lo.minor] : []));
  if (new Set(minors).size !== minors.length) report.misbound.push(`round ${r}: one minor twice in ${minors}`);
  bound.forEach((b, i) => {
    if (!b) return;
    report.attached++;
    try {
      check(b.lo, i);
    } catch (e) {
      report.misbound.push(`${b.lo.path}: ${describe(e)}`);
    }
  });
  await Promise.all(
    bound.map(async (b) => {
      if (!b) return;
      try {
        await b.detach();
        report.detached++;
      } catch (e) {
        report.failures.push(`detach ${b.lo.path}: ${describe(e)}`);
        b.lo.close();
      }
    }),
  );
}
ctl.close();
for (const fd of fds) fs.closeSync(fd);
console.log(JSON.stringify(report));
