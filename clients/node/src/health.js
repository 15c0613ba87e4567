// The standard gRPC health service (grpc.health.v1.Health), for load balancers and the demo.

import grpc from '@grpc/grpc-js';

export const SERVING = 'SERVING';
export const NOT_SERVING = 'NOT_SERVING';
const SERVICE_UNKNOWN = 'SERVICE_UNKNOWN';

/**
 * Answers Check and Watch from a table of service name -> status; "" is the whole server.
 * An unknown service is NOT_FOUND to Check and SERVICE_UNKNOWN to Watch, as the protocol says.
 */
export class HealthService {
  #statuses = new Map();
  #watchers = new Set();

  /** @param {Record<string, string>} [statuses] initial statuses by service name */
  constructor(statuses = {}) {
    for (const [service, status] of Object.entries(statuses)) this.#statuses.set(service, status);
  }

  /** Set a service's status and tell its watchers. */
  setStatus(service, status) {
    this.#statuses.set(service, status);
    for (const watcher of this.#watchers) {
      if (watcher.service === service) watcher.call.write({ status });
    }
  }

  /** Report every service NOT_SERVING and end the Watch streams, so a shutdown is not held up. */
  enterGracefulShutdown() {
    for (const service of this.#statuses.keys()) this.setStatus(service, NOT_SERVING);
    for (const watcher of this.#watchers) watcher.call.end();
    this.#watchers.clear();
  }

  /** The handlers to mount with server.addService(contract.healthService, ...). */
  handlers() {
    return {
      Check: (call, callback) => {
        const status = this.#statuses.get(call.request.service);
        if (status === undefined) {
          callback({ code: grpc.status.NOT_FOUND, details: `unknown service ${call.request.service}` });
        } else {
          callback(null, { status });
        }
      },
      Watch: (call) => {
        const watcher = { service: call.request.service, call };
        this.#watchers.add(watcher);
        call.on('cancelled', () => this.#watchers.delete(watcher));
        call.on('close', () => this.#watchers.delete(watcher));
        call.write({ status: this.#statuses.get(watcher.service) ?? SERVICE_UNKNOWN });
      },
    };
  }
}
