/**
 * 4 processes attach and detach N files of their own at the same time, round after round: every attach
 * succeeds, every device is bound to its own file (isBoundTo and sysfs agree), nothing stays bound.
 */
import * as fs from 'node:fs';
import { boundAfterSettling, tempDir } from '../helpers.js';
import type { Report } from './children/attacher.js';
import { finished, makeImage, scaled, spawnChild, stressTest } from './fixtures.js';

const PROCESSES = 4;
const FILES = scaled(8, 2); // N concurrent attaches per process
const ROUNDS = scaled(40, 2);

async function run(dir: string, apis: Report['api'][]): Promise<Report[]> {
  const children = apis.map((api, p) => {
    const files = Array.from({ length: FILES }, (_, i) => makeImage(dir, `p${p}-f${i}.img`, 1 << 20));
    return finished(spawnChild('attacher.ts', [JSON.stringify({ files, rounds: ROUNDS, api })]));
  });
  const results = await Promise.all(children);
  return results.map((r, p) => {
    if (r.code !== 0) throw new Error(`child ${p} (${apis[p]}) exited ${r.code ?? r.signal}: ${r.stderr}`);
    return JSON.parse(r.stdout.trim().split('\n').at(-1)!) as Report;
  });
}

function assertReports(t: import('ava').ExecutionContext, reports: Report[]): void {
  for (const r of reports) {
    t.deepEqual(r.failures, [], `${r.api}: failures`);
    t.deepEqual(r.misbound, [], `${r.api}: devices bound to something else than their file`);
    t.is(r.attached, FILES * ROUNDS, `${r.api}: attached`);
    t.is(r.detached, FILES * ROUNDS, `${r.api}: detached`);
  }
  const minors = new Set(reports.flatMap((r) => r.minors));
  t.log(`${PROCESSES} processes × ${FILES} files × ${ROUNDS} rounds = ${PROCESSES * FILES * ROUNDS} attaches on ${minors.size} distinct devices`);
}

stressTest.serial(`${PROCESSES} processes × N concurrent loopForFd + detach on their own files`, async (t) => {
  const dir = tempDir(t);
  const reports = await run(dir, Array<Report['api']>(PROCESSES).fill('loopForFd'));
  assertReports(t, reports);
  t.deepEqual(await boundAfterSettling(dir, 5000), [], 'devices left bound');
});

stressTest.serial(`${PROCESSES} processes mixing loopForFd, loopForFdSync, attach and attachSync`, async (t) => {
  const dir = tempDir(t);
  const reports = await run(dir, ['loopForFd', 'loopForFdSync', 'attach', 'attachSync']);
  assertReports(t, reports);
  t.deepEqual(await boundAfterSettling(dir, 5000), [], 'devices left bound');
  t.is(fs.readdirSync(dir).length, PROCESSES * FILES);
});
