/** The osbuild-compatible remote loop server and client. */
export { LoopServer, type LoopServerOptions, type LoopServerQuotas, type LoopServerStats } from './server.js';
export { LoopClient, RemoteDevice, RemoteLoopError, type RemoteDeviceOptions } from './client.js';
export { serve, type ServeOptions } from './serve.js';
