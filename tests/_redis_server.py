"""Throw-away redis-servers for tests: loopback only, temp dirs, no persistence.

* :class:`RedisServer`: one server; optionally with ``requirepass``, an ACL
  user, or TLS only (a throwaway certificate made with ``openssl``).
* :class:`RedisClusterServers`: a real 3-master Redis Cluster
  (``--cluster-enabled yes`` x3, joined by ``redis-cli --cluster create``).
* :func:`tls_support`: whether this redis-server build can serve TLS.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = [
    "RedisClusterServers",
    "RedisServer",
    "free_port",
    "make_certificate",
    "redis_cli_binary",
    "redis_server_binary",
    "tls_support",
]

LOOPBACK = "127.0.0.1"


def redis_server_binary() -> str | None:
    """Path of ``redis-server`` (``$REDIS_SERVER`` or on PATH), or None."""
    explicit = os.environ.get("REDIS_SERVER")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    return shutil.which("redis-server")


def redis_cli_binary() -> str | None:
    """Path of ``redis-cli`` (``$REDIS_CLI``, next to redis-server, or on PATH), or None."""
    explicit = os.environ.get("REDIS_CLI")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    server = redis_server_binary()
    if server is not None:
        beside = Path(server).with_name("redis-cli")
        if os.access(beside, os.X_OK):
            return str(beside)
    return shutil.which("redis-cli")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_port(*, bus: bool = False) -> int:
    """A TCP port free on 127.0.0.1 right now (with ``bus``: port + 10000 free too)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((LOOPBACK, 0))
            port = int(s.getsockname()[1])
        if not bus or (port + 10000 <= 65535 and _port_free(port + 10000)):
            return port
    raise RuntimeError("no free loopback port (with a free cluster bus port)")


def _ping(port: int, timeout: float = 0.2, *, tls: ssl.SSLContext | None = None) -> bool:
    # any answer to PING means "up" (+PONG, or -NOAUTH from a server with a password)
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as raw:
            s = raw if tls is None else tls.wrap_socket(raw, server_hostname=LOOPBACK)
            s.sendall(b"PING\r\n")
            reply = s.recv(64)
            return reply.startswith((b"+PONG", b"-NOAUTH"))
    except (OSError, ssl.SSLError):
        return False


def tls_support(binary: str) -> bool:
    """Whether ``binary`` was built with TLS.

    A build without TLS refuses the ``tls-port`` directive ("Bad directive");
    one with TLS reads it and, listening nowhere, exits at once.
    """
    try:
        res = subprocess.run(
            [binary, "--port", "0", "--tls-port", "0", "--save", "", "--appendonly", "no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "Bad directive" not in res.stdout + res.stderr


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A throwaway self-signed certificate for 127.0.0.1: (cert, key) files made by openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("openssl is not installed")
    cert, key = directory / "server.crt", directory / "server.key"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


class RedisServer:
    """One redis-server process on 127.0.0.1:``port``; stop/start/kill at will.

    The port stays the same across restarts, so clients reconnect to it. Data
    does not survive a restart (``--save '' --appendonly no``).
    """

    def __init__(
        self,
        binary: str,
        *,
        port: int | None = None,
        password: str | None = None,
        acl_user: tuple[str, str] | None = None,
        tls: bool = False,
        cluster: bool = False,
    ) -> None:
        self.binary = binary
        self.port = port or free_port(bus=cluster)
        self.password = password
        self.acl_user = acl_user
        self.cluster = cluster
        self._tmp = tempfile.TemporaryDirectory(prefix="aiomemo-redis-")
        self.dir = Path(self._tmp.name)
        self.proc: subprocess.Popen[bytes] | None = None
        self.cert: Path | None = None
        self._tls_ctx: ssl.SSLContext | None = None
        if tls:
            self.cert, self.key = make_certificate(self.dir)
            self._tls_ctx = ssl.create_default_context(cafile=str(self.cert))

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0`` (``rediss://`` with TLS; no credentials)."""
        scheme = "rediss" if self._tls_ctx is not None else "redis"
        return f"{scheme}://{LOOPBACK}:{self.port}/0"

    def url_with(self, user: str | None, password: str) -> str:
        """The URL with credentials (``user`` None: the default user)."""
        scheme, rest = self.url.split("://", 1)
        who = f"{user}:{password}" if user else f":{password}"
        return f"{scheme}://{who}@{rest}"

    def _args(self) -> list[str]:
        args = ["--port", str(self.port)]
        if self._tls_ctx is not None:
            assert self.cert is not None
            args = [
                "--port",
                "0",
                "--tls-port",
                str(self.port),
                "--tls-cert-file",
                str(self.cert),
                "--tls-key-file",
                str(self.key),
                "--tls-ca-cert-file",
                str(self.cert),
                "--tls-auth-clients",
                "no",
            ]
        if self.password is not None:
            args += ["--requirepass", self.password]
        if self.acl_user is not None:
            name, pw = self.acl_user
            args += ["--user", name, "on", f">{pw}", "~*", "&*", "+@all"]
        if self.cluster:
            args += [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "1000",
                "--cluster-require-full-coverage",
                "no",
            ]
        return args

    @property
    def running(self) -> bool:
        """Whether the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it answers PING."""
        if self.running:
            return
        log = open(self.dir / "redis.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                self.binary,
                *self._args(),
                "--bind",
                LOOPBACK,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                "--protected-mode",
                "yes",
                "--daemonize",
                "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self.proc.returncode}: {self.log_tail()}"
                )
            if _ping(self.port, tls=self._tls_ctx):
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer PING in {timeout}s: {self.log_tail()}")

    def stop(self, *, kill: bool = False, timeout: float = 5.0) -> None:
        """Stop the server (SIGTERM; SIGKILL with ``kill=True`` or when it lingers)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        # wait until the port no longer answers
        deadline = time.monotonic() + timeout
        while _ping(self.port, tls=self._tls_ctx) and time.monotonic() < deadline:
            time.sleep(0.02)

    def restart(self) -> None:
        """Stop and start again on the same port."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        self._tmp.cleanup()

    def log_tail(self, n: int = 20) -> str:
        """The last lines of the server's log."""
        try:
            lines = (self.dir / "redis.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


class RedisClusterServers:
    """A 3-master Redis Cluster on free loopback ports (no replicas, no persistence).

    ``--cluster-require-full-coverage no``: while one master is down, the
    slots of the others keep answering. A master killed and started again
    rejoins with its slots (its ``nodes.conf`` survives in its directory) but
    empty.
    """

    def __init__(self, binary: str, cli: str, *, masters: int = 3) -> None:
        self.cli = cli
        self.nodes = [RedisServer(binary, cluster=True) for _ in range(masters)]

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT`` of the first node (any node leads to all)."""
        return f"redis://{LOOPBACK}:{self.nodes[0].port}"

    def start(self, timeout: float = 30.0) -> None:
        """Start every node, join them, and wait until the cluster is ok."""
        for n in self.nodes:
            n.start()
        subprocess.run(
            [
                self.cli,
                "--cluster",
                "create",
                *(f"{LOOPBACK}:{n.port}" for n in self.nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        self.wait_ok(timeout)

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until every running node says ``cluster_state:ok`` and knows every slot."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self._ok(n) for n in self.nodes if n.running):
                return
            time.sleep(0.1)
        raise RuntimeError("the Redis Cluster did not become ok in time")

    def _ok(self, node: RedisServer) -> bool:
        res = subprocess.run(
            [self.cli, "-h", LOOPBACK, "-p", str(node.port), "cluster", "info"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        info = res.stdout
        return "cluster_state:ok" in info and "cluster_slots_ok:16384" in info

    def close(self) -> None:
        """Stop every node and remove their directories."""
        for n in self.nodes:
            n.close()
