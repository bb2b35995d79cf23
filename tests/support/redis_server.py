"""A redis-server of a test's own: a free port, its own directory, killed and restarted at will.

    with RedisServer(appendonly=True) as server:          # AOF, fsync on every write
        run_cohort(db=0, redis_base=server.base_url, ...)
        server.kill()                                     # SIGKILL, as a crash would
        server.start()                                    # same port, same directory: reloads the AOF

Options cover what the delivery and security tests need: append-only persistence, a password
(``requirepass``) and TLS (``tls_material`` makes a throwaway CA and server certificate with
``openssl``). Every server started here is stopped on exit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import redis

__all__ = ["RedisServer", "TlsMaterial", "free_port", "redis_binary", "tls_material"]


def redis_binary() -> str | None:
    """``redis-server`` on PATH, or ``None``."""
    return shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class TlsMaterial:
    """A CA and a server certificate for 127.0.0.1 signed by it (PEM files)."""

    ca: Path
    cert: Path
    key: Path


def tls_material(directory: Path) -> TlsMaterial:
    """Make a throwaway CA and a server certificate (SAN IP:127.0.0.1) with the ``openssl`` CLI.

    Raises:
        RuntimeError: ``openssl`` is missing or refused (its output is in the message).
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("the openssl command is not installed")
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    cert, key, csr = directory / "server.pem", directory / "server.key", directory / "server.csr"
    ext = directory / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                   "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    steps = [
        [openssl, "req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
         "-subj", "/CN=cohort-test-ca", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        [openssl, "req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1"],
        [openssl, "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
         "-out", str(cert), "-days", "2", "-extfile", str(ext)],
    ]
    for argv in steps:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:3])} failed: {done.stderr.strip()}")
    return TlsMaterial(ca=ca, cert=cert, key=key)


class RedisServer:
    """One redis-server process on 127.0.0.1, restartable on the same port and directory."""

    def __init__(self, *, appendonly: bool = False, password: str | None = None, tls: TlsMaterial | None = None,
                 plain: bool = True, directory: Path | None = None) -> None:
        binary = redis_binary()
        if binary is None:
            raise RuntimeError("redis-server is not on PATH")
        self.binary = binary
        self.appendonly = appendonly
        self.password = password
        self.tls = tls
        if not plain and tls is None:
            raise ValueError("a server without its plain port needs TLS")
        self.plain = plain
        self.port = free_port() if plain else 0
        self.tls_port = free_port() if tls is not None else None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if directory is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="cohort-redis-")
            directory = Path(self._tmp.name)
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.directory / "redis.log"

    # --- addresses -----------------------------------------------------------------------
    def _auth(self) -> str:
        return f":{quote(self.password, safe='')}@" if self.password else ""

    @property
    def base_url(self) -> str:
        """``redis://[:password@]127.0.0.1:PORT`` (no db): what ``run_cohort(redis_base=...)`` takes."""
        return f"redis://{self._auth()}127.0.0.1:{self.port}"

    def url(self, db: int = 0) -> str:
        return f"{self.base_url}/{db}"

    def tls_url(self, db: int = 0, *, verify: bool = True) -> str:
        """``rediss://`` URL of the TLS port, checking the certificate against the test CA (or not)."""
        if self.tls is None or self.tls_port is None:
            raise RuntimeError("this server was started without TLS")
        query = (f"ssl_cert_reqs=required&ssl_ca_certs={quote(str(self.tls.ca), safe='/')}" if verify
                 else "ssl_cert_reqs=none")
        return f"rediss://{self._auth()}127.0.0.1:{self.tls_port}/{db}?{query}"

    def client(self, db: int = 0) -> redis.Redis:
        """A client of the plain port, or of the TLS port (checking the certificate) without one."""
        url = self.url(db) if self.plain else self.tls_url(db)
        return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)

    # --- life cycle ----------------------------------------------------------------------
    def argv(self) -> list[str]:
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
                "--save", "", "--daemonize", "no", "--logfile", str(self.log_path)]
        if self.appendonly:
            argv += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            argv += ["--appendonly", "no"]
        if self.password:
            argv += ["--requirepass", self.password]
        if self.tls is not None:
            argv += ["--tls-port", str(self.tls_port), "--tls-cert-file", str(self.tls.cert),
                     "--tls-key-file", str(self.tls.key), "--tls-ca-cert-file", str(self.tls.ca),
                     "--tls-auth-clients", "no"]
        return argv

    def start(self, *, timeout: float = 20.0) -> RedisServer:
        """Start (or start again, on the same port and directory) and wait until it answers PING."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("the server is already running")
        self.process = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        probe = self.client()
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.process.returncode}: {self.log_tail()}")
                try:
                    if probe.ping():
                        return self
                except (redis.ConnectionError, redis.BusyLoadingError, redis.TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer within {timeout} s: {self.log_tail()}")
                time.sleep(0.05)
        finally:
            probe.close()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` (default SIGKILL: no chance to flush anything) and wait for the exit."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill(signal.SIGTERM)
            if self.process.poll() is None:
                self.kill(signal.SIGKILL)
        self.process = None

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
