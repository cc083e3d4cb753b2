// The reliability (stress) suite: `npm run test:stress` (= `ava --config ava.stress.config.mjs`).
// Size with STRESS_SCALE (default 1: the reduced run CI does, a few minutes on 2 cores).
export default {
  files: ['__test__/stress/**/*.test.ts'],
  extensions: { ts: 'module' },
  nodeArguments: ['--import=tsx'],
  workerThreads: false,
  environmentVariables: { LOOPDEV_STRESS: '1' },
  // One spec file at a time: they measure system-wide state (losetup, bound devices) and load the machine.
  concurrency: 1,
  timeout: '5m',
};
