"""grpc.health.v1 for a server that drains: grpc_health's servicer, with Watch streams that end at shutdown.

grpc_health's `Watch` loops until the client goes away, and `server.stop(grace)` waits for every RPC in
flight: one client watching health (gRPC's client-side health checking does) would hold every SIGTERM
for the whole --grace. Here a Watch sends NOT_SERVING at shutdown and then ends (OK), like the rest
of the in-flight RPCs once they are done.
"""
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class DrainingHealthServicer(HealthServicer):
    """The upstream servicer (grpcio-health-checking, pinned in requirements.txt) with its Watch loop
    ending once shutdown has begun. It uses the parent's condition per watched service, so `set` and
    `enter_graceful_shutdown` wake it as they wake the parent's."""

    async def Watch(self, request, context):
        condition = self._server_watchers[request.service]
        self._watcher_count_by_service[request.service] += 1
        last = None
        try:
            async with condition:
                while True:
                    status = self._server_status.get(request.service, UNKNOWN)
                    if self._gracefully_shutting_down and status != UNKNOWN:
                        status = NOT_SERVING  # the parent sets the flag before it updates each service
                    if status != last:
                        await context.write(health_pb2.HealthCheckResponse(status=status))
                        last = status
                    if self._gracefully_shutting_down:
                        return
                    await condition.wait()
        finally:
            self._watcher_count_by_service[request.service] -= 1
            if self._watcher_count_by_service[request.service] == 0:
                del self._server_watchers[request.service]
                del self._watcher_count_by_service[request.service]

    async def enter_graceful_shutdown(self):
        await super().enter_graceful_shutdown()
        # The parent wakes the watchers of the services it knows; a Watch of an unknown name waits too.
        for condition in list(self._server_watchers.values()):
            async with condition:
                condition.notify_all()
