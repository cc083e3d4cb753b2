/**
 * The same smoke script (fixtures/smoke.ts: attach, getStatus, isBoundTo, `using` cleanup, error shape)
 * under node, bun and deno, importing the built package (dist/). Needs `npm run build` first.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { boundAfterSettling, image, loopTest } from './helpers.js';

const entry = path.resolve('dist/index.js');
const smoke = path.resolve('__test__/fixtures/smoke.ts');
const bin = (name: string) => path.resolve('node_modules/.bin', name);

const RUNTIMES: Array<[string, string, string[]]> = [
  ['node', process.execPath, ['--import=tsx', smoke]],
  ['bun', bin('bun'), [smoke]],
  // The addon needs --allow-ffi; reading /sys needs --allow-all in Deno.
  ['deno', bin('deno'), ['run', '--allow-all', '--quiet', smoke]],
];

for (const [name, exe, args] of RUNTIMES) {
  loopTest(`the smoke script passes under ${name}`, async (t) => {
    t.timeout(60_000);
    t.true(fs.existsSync(entry), 'run `npm run build` first');
    t.true(fs.existsSync(exe), `${name} is installed as a dev dependency`);
    const img = image(t);
    const out = execFileSync(exe, [...args, entry, img.path], { encoding: 'utf8', env: { ...process.env, NO_COLOR: '1' } });
    const result = JSON.parse(out.trim().split('\n').pop()!);
    t.like(result, {
      bound: true,
      infoBoundTo: true,
      autoclear: true,
      fileName: img.path,
      unboundAfterUsing: true,
      error: { isLoopError: true, code: 'ENOENT', errno: -2, syscall: 'open', path: '/dev/loop999999' },
    });
    t.deepEqual(await boundAfterSettling(img.path), []);
  });
}
