export { LoopControl, type LoopForFdOptions } from './control.js';
export {
  Loop,
  removeNode,
  DETACH_TIMEOUT_MS,
  type ClearFdWaitOptions,
  type ConfigureOptions,
  type LoopOptions,
  type StatusOptions,
} from './loop.js';
export { LoopInfo, type FileIdentity } from './info.js';
export { LoopError, UnexpectedDeviceError, type LoopErrorFields, type UnexpectedDeviceFields } from './errors.js';
export * from './constants.js';
export { attach, attachSync, type AttachOptions } from './attach.js';
export { LoopDevice, detach, detachSync, type DetachOptions } from './device.js';
export type {
  Partition,
  GptPartition,
  MbrPartition,
  PartitionQuery,
  PartitionTable,
  PartitionTypeName,
} from './partitions.js';
export { list, listSync, find, findSync, deviceInfo, deviceInfoSync } from './list.js';
export type { LoopBinding, LoopDeviceInfo } from './state.js';
export { LoopServer, LoopClient, RemoteDevice, RemoteLoopError, serve, type LoopServerOptions, type LoopServerQuotas, type LoopServerStats, type RemoteDeviceOptions, type ServeOptions } from './remote/index.js';
