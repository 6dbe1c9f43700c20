#!/usr/bin/env python3
"""A Demi Conductor plugin in Python that echoes jobs.

It follows proto/README.md step by step: check the handshake, serve
grpc.health.v1.Health and demi.plugin.v1.Plugin on the socket the conductor
named, report SERVING, drain on Shutdown or SIGTERM, leave when the
conductor is gone. The gRPC code is generated from proto/ at set-up time
(`make python-plugin`), into gen/.

PYTHON_ECHO_BROKEN breaks it on purpose, for the conformance tests:
no-cookie-check, never-serving, ignore-shutdown or wrong-socket.
PYTHON_ECHO_NO_PARENT_WATCH=1 leaves the conductor's death to the
kernel's death signal alone.
"""

import os
import signal
import sys
import threading
from concurrent import futures

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "gen"))

import grpc  # noqa: E402
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # noqa: E402

from demi.plugin.v1 import plugin_pb2, plugin_pb2_grpc  # noqa: E402

MAGIC_COOKIE_KEY = "DEMI_PLUGIN_MAGIC_COOKIE"
MAGIC_COOKIE_VALUE = "7d3c0a91-demi-conductor-plugin"
PROTOCOL_VERSION = 1
EXIT_CONFIG = 78  # started wrongly: the conductor never restarts this
BROKEN = os.environ.get("PYTHON_ECHO_BROKEN", "")


def refuse(message):
    print(f"python-echo: {message}", file=sys.stderr)
    sys.exit(EXIT_CONFIG)


def handshake():
    """Step 1: read the environment the conductor set."""
    if os.environ.get(MAGIC_COOKIE_KEY) != MAGIC_COOKIE_VALUE and BROKEN != "no-cookie-check":
        refuse("this is a Demi Conductor plugin: it is started by the conductor, not by hand")
    offered = os.environ.get("DEMI_PLUGIN_PROTOCOL_VERSIONS", "")
    versions = [int(v) for v in offered.split(",") if v.strip().isdigit()]
    if PROTOCOL_VERSION not in versions:
        refuse(f"no common protocol version: the conductor accepts {versions}, this plugin speaks [1]")
    socket = os.environ.get("DEMI_PLUGIN_SOCKET", "/tmp/python-echo.sock")
    name = os.environ.get("DEMI_PLUGIN_NAME", "python-echo")
    return socket, name


class Echo(plugin_pb2_grpc.PluginServicer):
    """Step 3: the Plugin service."""

    def __init__(self, name, stopping, grace):
        self.name = name
        self.stopping = stopping
        self.grace = grace

    def Describe(self, request, context):
        return plugin_pb2.DescribeResponse(
            name=self.name,
            version="0.1.0",
            protocol_version=PROTOCOL_VERSION,
            capabilities=["jobs"],
        )

    def Handle(self, job, context):
        if self.stopping.is_set():
            # UNAVAILABLE: the conductor delivers the job elsewhere.
            context.abort(grpc.StatusCode.UNAVAILABLE, "plugin is shutting down")
        return plugin_pb2.JobResult(
            job_id=job.id,
            outcome=plugin_pb2.JobResult.OUTCOME_OK,
            payload=job.payload,
        )

    def Shutdown(self, request, context):
        if BROKEN != "ignore-shutdown":
            if request.HasField("grace"):
                self.grace[0] = request.grace.ToTimedelta().total_seconds()
            self.stopping.set()
        return plugin_pb2.ShutdownResponse()


def watch_parent(stopping):
    """Step 4: leave when the conductor is gone (no pidfd in Python's
    standard library, so a cheap check twice a second)."""
    parent = os.getppid()
    while not stopping.wait(0.5):
        if os.getppid() != parent:
            stopping.set()


def main():
    socket, name = handshake()
    if os.path.exists(socket):
        os.unlink(socket)  # stale socket from a crashed predecessor
    if BROKEN == "wrong-socket":
        socket += ".wrong"

    stopping = threading.Event()
    grace = [30.0]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    plugin_pb2_grpc.add_PluginServicer_to_server(Echo(name, stopping, grace), server)
    health_servicer = health.HealthServicer()
    # The stock servicer answers SERVING for "" from the start: not ready yet.
    health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port("unix:" + socket)
    server.start()

    # Step 2: SERVING for "" and for our name, once we can take work.
    status = health_pb2.HealthCheckResponse.SERVING
    if BROKEN == "never-serving":
        status = health_pb2.HealthCheckResponse.NOT_SERVING
    health_servicer.set("", status)
    health_servicer.set(name, status)
    print('{"level":"info","msg":"python echo serving"}', flush=True)

    # SIGTERM means the same as Shutdown.
    if BROKEN != "ignore-shutdown":
        signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    else:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if not os.environ.get("PYTHON_ECHO_NO_PARENT_WATCH"):
        threading.Thread(target=watch_parent, args=(stopping,), daemon=True).start()

    # Python runs signal handlers only in the main thread, between
    # bytecodes; a SIGTERM the kernel delivers to one of grpc's threads
    # does not wake a main thread blocked for good. Waking up twice a
    # second lets the handler run.
    while not stopping.wait(0.5):
        pass
    health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    server.stop(grace[0]).wait()
    if os.path.exists(socket):
        os.unlink(socket)
    sys.exit(0)


if __name__ == "__main__":
    main()
