"""The gRPC server bootstrap every service uses: health, reflection, metrics, graceful stop.

A service's app subclasses ``ServiceApp``: its ``start`` builds the service's parts and hands
the servicer, background tasks and cleanups to ``serve``; this module owns the parts that must
be identical everywhere, down to the stop on SIGTERM (``serve_until_signal``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shared.interceptors import Behaviour, Continuation, Handler, refusal, wrap_behaviour
from shared.logs import REQUEST_ID, REQUEST_ID_METADATA, request_id_from
from shared.metrics import RPC_LATENCY, RPC_TOTAL, code_name, start_metrics_endpoint
from shared.security import TokenAuthInterceptor, server_credentials
from shared.settings import GrpcSettings, ServiceSettings

logger = logging.getLogger(__name__)

#: How long cancelled background tasks get to finish when a server stops.
TASK_STOP_TIMEOUT_S = 5.0

#: Methods whose wrapped handler ``CallInterceptor`` keeps (far more than any service has).
MAX_CACHED_METHODS = 256

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def advertised_host(bound: str) -> str:
    """The host others reach a server bound to ``bound`` at: its name when bound to every address."""
    return socket.gethostname() if bound in ("", "0.0.0.0", "::", "[::]") else bound


class CallInterceptor(grpc.aio.ServerInterceptor):
    """Every RPC's bookkeeping in one wrapper: its request id, latency and status metrics, and the
    count of calls in progress that a graceful stop waits for.

    One interceptor, not one per concern: each interceptor costs a coroutine, a handler and a
    wrapper per call, and the wrapped handler of a method is built once and reused.

    Request id: the caller's ``x-request-id`` metadata when acceptable, else a new one; set for
    the call's log lines and returned in the trailing metadata.

    Draining: gRPC cancels (CANCELLED) every call still queued, not yet handed to the application,
    when a server stops. So on SIGTERM the server first keeps taking calls and refuses the new ones
    with UNAVAILABLE while those in progress finish, and only then stops.
    """

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        #: Per method: the handler gRPC gave, and its wrapped twin.
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self,
        continuation: Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith("/grpc."):
            return handler  # health keeps answering (NOT_SERVING) while draining
        if self.draining:
            refused = refusal(
                handler, grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry elsewhere"
            )
            return wrap_behaviour(refused, lambda behaviour: self._wrap(behaviour, method))
        known = self._wrapped.get(method)
        if known is not None and known[0] is handler:
            return known[1]
        wrapped = wrap_behaviour(handler, lambda behaviour: self._wrap(behaviour, method))
        # The first handler seen for a method is kept, for a bounded number of methods: a caller
        # without the auth token may name any method and gets a new refusal handler each time.
        if method not in self._wrapped and len(self._wrapped) < MAX_CACHED_METHODS:
            self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, behaviour: Behaviour, method: str) -> Behaviour:
        latency = RPC_LATENCY.labels(method)
        ok = RPC_TOTAL.labels(method, "OK")

        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            self.in_flight += 1
            self.idle.clear()
            request_id = request_id_from(context.invocation_metadata())
            token = REQUEST_ID.set(request_id)
            start = time.perf_counter()
            failure: str | None = None
            try:
                context.set_trailing_metadata(((REQUEST_ID_METADATA, request_id),))
                return await behaviour(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception:
                failure = "UNKNOWN"
                raise
            finally:
                latency.observe(time.perf_counter() - start)
                code = failure or code_name(context.code())
                (ok if code == "OK" else RPC_TOTAL.labels(method, code)).inc()
                REQUEST_ID.reset(token)
                self.in_flight -= 1
                if self.in_flight == 0:
                    self.idle.set()

        return call


@dataclass
class RunningServer:
    """A started gRPC server with its health servicer and the port it bound."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    service_names: Sequence[str]
    drain: CallInterceptor
    drain_s: float = 0.5
    #: Background work (consumers, relays) cancelled after the RPCs have drained.
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    #: Run last, in reverse order of registration (NATS drain, engine dispose).
    cleanups: list[Callable[[], Awaitable[Any]]] = field(default_factory=list)

    async def set_serving(self, serving: bool) -> None:
        """Sets the health of every service this server hosts (and the server as a whole)."""
        status = SERVING if serving else NOT_SERVING
        for name in ("", *self.service_names):
            await self.health.set(name, status)

    async def stop(self, grace_s: float) -> None:
        """Stops in the documented order: health NOT_SERVING, refuse new calls (UNAVAILABLE) while
        the ones in progress finish (within ``grace_s``), stop the server, cancel background tasks,
        run the cleanups."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        await self.health.enter_graceful_shutdown()
        self.drain.draining = True
        # Calls sent just before the signal may still sit in gRPC's queue: give them a moment to be
        # taken (served, or refused UNAVAILABLE) before the queue is cancelled by the stop.
        await asyncio.sleep(min(self.drain_s, grace_s))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.drain.idle.wait(), max(0.0, deadline - loop.time()))
        await self.server.stop(max(0.0, deadline - loop.time()))
        for task in self.tasks:
            task.cancel()
        if self.tasks:
            # A task that swallows its cancellation (nats-py requests can) must not hold the exit.
            done, pending = await asyncio.wait(self.tasks, timeout=TASK_STOP_TIMEOUT_S)
            for task in pending:
                logger.warning("background task %s ignored its cancellation; leaving it", task.get_name())
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    logger.error("background task %s had failed", task.get_name(), exc_info=task.exception())
        for cleanup in reversed(self.cleanups):
            try:
                await cleanup()
            except Exception:
                logger.exception("cleanup failed during shutdown")


async def start_grpc_server(
    settings: GrpcSettings,
    service_names: Sequence[str],
    register: Callable[[grpc.aio.Server], None],
    interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
) -> RunningServer:
    """Builds, binds and starts a ``grpc.aio`` server with health and reflection."""
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    security: list[grpc.aio.ServerInterceptor] = []
    if settings.auth_token is not None:
        security.append(TokenAuthInterceptor(settings.auth_token.get_secret_value()))
    drain = CallInterceptor()
    server = grpc.aio.server(
        interceptors=[drain, *security, *interceptors],
        options=options,
    )
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    address = f"{settings.host}:{settings.port}"
    credentials = server_credentials(settings.tls)
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"could not bind gRPC port {settings.host}:{settings.port}; is it in use?")
    await server.start()
    running = RunningServer(
        server=server,
        health=health_servicer,
        port=port,
        service_names=service_names,
        drain=drain,
        drain_s=settings.drain_s,
    )
    await running.set_serving(True)
    return running


async def wait_for_stop_signal() -> None:
    """Returns when SIGTERM or SIGINT arrives."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


class Service(Protocol):
    """What a service's app object offers: start (binding its port) and a graceful stop."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


S = TypeVar("S")


class ServiceApp:
    """The start-up and shutdown every service shares. A service's app subclasses it: its ``start``
    builds the service's parts, then calls ``serve``; its ``stop`` calls this one first."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.server: RunningServer | None = None
        #: The port of the /metrics endpoint, when it is enabled.
        self.metrics_port: int | None = None

    @property
    def port(self) -> int:
        """The gRPC port bound (useful when the settings asked for port 0)."""
        assert self.server is not None, "not started"
        return self.server.port

    async def serve(
        self,
        service_name: str,
        add_servicer: Callable[[S, grpc.aio.Server], None],
        servicer: S,
        *,
        tasks: Mapping[str, Coroutine[Any, Any, Any]] | None = None,
        cleanups: Sequence[Callable[[], Awaitable[Any]]] = (),
    ) -> RunningServer:
        """Starts the gRPC server hosting ``servicer`` (``add_servicer`` is the generated
        ``add_<Service>Servicer_to_server``), the background ``tasks`` by name and the /metrics
        endpoint; ``cleanups`` run when it stops, last first."""
        s = self.settings
        tasks = tasks or {}
        try:
            server = self.server = await start_grpc_server(
                s.grpc, [service_name], lambda grpc_server: add_servicer(servicer, grpc_server)
            )
        except BaseException:
            for work in tasks.values():
                work.close()  # never started: no "coroutine was never awaited" warnings
            raise
        server.cleanups += cleanups
        server.tasks += [asyncio.create_task(work, name=name) for name, work in tasks.items()]
        self.metrics_port = start_metrics_endpoint(s.metrics)
        return server

    async def stop(self) -> None:
        """Stops gracefully (see ``RunningServer.stop``) within the gRPC settings' grace period."""
        if self.server is not None:
            await self.server.stop(self.settings.grpc.grace_s)


async def serve_until_signal(app: Service) -> None:
    """Starts the app, waits for SIGTERM/SIGINT, then stops it gracefully."""
    await app.start()
    try:
        await wait_for_stop_signal()
        logger.info("stop signal received; shutting down")
    finally:
        await app.stop()


def full_service_name(file_descriptor: FileDescriptor, service: str) -> str:
    """The fully qualified name of a service in a generated ``*_pb2`` module's descriptor."""
    return str(file_descriptor.services_by_name[service].full_name)
