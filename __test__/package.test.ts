/**
 * The package as users get it: `npm pack` the main package and the x64 platform package, install both
 * tarballs offline into an empty project, and attach/detach from there with no Rust toolchain on PATH.
 * Needs `npm run build` first (scripts/test.sh does it).
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { image, loopTest, tempDir, boundAfterSettling } from './helpers.js';

const root = path.resolve('.');
const platform = 'linux-x64-gnu';

function pack(dir: string, into: string): string {
  const out = execFileSync('npm', ['pack', '--silent', '--pack-destination', into], { cwd: dir, encoding: 'utf8' });
  return path.join(into, out.trim().split('\n').pop()!);
}

const SCRIPT = `
import { LoopControl } from '@loopdev/loop';
import * as fs from 'node:fs';
const fd = fs.openSync(process.argv[2], 'r+');
const ctl = new LoopControl();
const lo = await ctl.loopForFdAsync(fd, { blockSize: 4096 });
const bound = lo.isBoundTo(fd);
await lo[Symbol.asyncDispose]();
ctl.close();
console.log(JSON.stringify({ bound, minor: lo.minor }));
`;

loopTest.serial('packed tarballs install offline and work without cargo or rustc on PATH', async (t) => {
  t.timeout(120_000);
  t.true(fs.existsSync(path.join(root, 'dist/index.js')), 'run `npm run build` first');
  const work = tempDir(t);
  // Stage what a release job has: the package, its npm/<platform> dirs, and the built addon as an artifact.
  const stage = path.join(work, 'stage');
  fs.mkdirSync(path.join(stage, 'artifacts'), { recursive: true });
  for (const entry of ['package.json', 'README.md', 'dist', 'npm']) {
    fs.cpSync(path.join(root, entry), path.join(stage, entry), { recursive: true });
  }
  for (const target of ['linux-x64-gnu', 'linux-arm64-gnu']) {
    const built = path.join(root, `loopdev.${target}.node`);
    t.true(fs.existsSync(built), `${built} missing: run npm run build:native and scripts/build-arm64.sh`);
    fs.copyFileSync(built, path.join(stage, 'artifacts', `loopdev.${target}.node`));
  }
  // `napi artifacts` moves each binary into its npm/<platform> package; `napi pre-publish` would then add
  // the platform packages as optionalDependencies (it also wants GitHub, so set them the same way here).
  execFileSync(path.join(root, 'node_modules/.bin/napi'), ['artifacts', '--output-dir', 'artifacts'], { cwd: stage });
  t.true(fs.existsSync(path.join(stage, 'npm', platform, `loopdev.${platform}.node`)));
  t.true(fs.existsSync(path.join(stage, 'npm/linux-arm64-gnu/loopdev.linux-arm64-gnu.node')));
  const targets = fs.readdirSync(path.join(stage, 'npm'));
  execFileSync('npm', ['pkg', 'set', ...targets.map((p) => `optionalDependencies.@loopdev/loop-${p}=0.1.0`)], {
    cwd: stage,
  });
  const main = pack(stage, work);
  const native = pack(path.join(stage, 'npm', platform), work);

  const listed = execFileSync('tar', ['-tzf', main], { encoding: 'utf8' }).split('\n').filter(Boolean);
  t.true(listed.includes('package/dist/index.js') && listed.includes('package/dist/index.d.ts'));
  t.deepEqual(
    listed.filter((f) => /__test__|\/target\/|\.rs$|\/crates\/|\.node$|\/ts\/|\/npm\//.test(f)),
    [],
    'no tests, sources or binaries in the main tarball',
  );

  const proj = path.join(work, 'proj');
  fs.mkdirSync(proj);
  fs.writeFileSync(path.join(proj, 'package.json'), JSON.stringify({ name: 'proj', private: true, type: 'module' }));
  // The arm64 optional dependency is not in any registry here; npm skips it, as it skips it on x64 anyway.
  execFileSync('npm', ['install', '--offline', '--no-audit', '--no-fund', '--loglevel=error', main, native], {
    cwd: proj,
  });
  fs.writeFileSync(path.join(proj, 'attach.mjs'), SCRIPT);

  // A PATH with node and nothing else: no cargo, rustc, cc.
  const bin = path.join(work, 'bin');
  fs.mkdirSync(bin);
  fs.symlinkSync(process.execPath, path.join(bin, 'node'));
  const img = image(t);
  const out = execFileSync(path.join(bin, 'node'), ['attach.mjs', img.path], {
    cwd: proj,
    env: { PATH: bin },
    encoding: 'utf8',
  });
  const result = JSON.parse(out) as { bound: boolean; minor: number };
  t.true(result.bound);
  t.deepEqual(await boundAfterSettling(img.path), []);
});
