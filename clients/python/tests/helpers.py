"""What the tests share: a real idemd started from IDEMD_BIN (default ../../target/debug/idemd) on a free
loopback port with a fresh SQLite database, and small helpers for keys, responses and call counting."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import uuid
from typing import Any, Callable, Dict, List, Optional

import grpc

from idemd.v1 import admin_pb2, admin_pb2_grpc
from idemd.v1 import idempotency_pb2 as pb
from idemd.v1 import idempotency_pb2_grpc as pb_grpc
from idemd_client import Response, fingerprint

NAMESPACE = "py-payments"
HERE = pathlib.Path(__file__).resolve().parent
# The shared scenario list and vectors (clients/testdata); IDEMD_TESTDATA points elsewhere.
TESTDATA = pathlib.Path(os.environ.get("IDEMD_TESTDATA", HERE.parents[1] / "testdata"))


def shared(name: str) -> dict:
    return json.loads((TESTDATA / name).read_text(encoding="utf-8"))


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


class Idemd:
    """``idemd serve`` on a free port; ready once it logs "idemd listening", which it does after binding."""

    def __init__(self, folder: Optional[str] = None):
        binary = os.environ.get("IDEMD_BIN", str(HERE.parents[2] / "target" / "debug" / "idemd"))
        if not os.access(binary, os.X_OK):
            raise RuntimeError(f"no idemd binary at {binary}: set IDEMD_BIN to a built idemd")
        # A folder made here is removed by stop().
        self.own_folder = None if folder else tempfile.mkdtemp(prefix="idemd-py-")
        folder = folder or self.own_folder
        self.address = free_address()
        self.process = subprocess.Popen(
            [binary, "serve", "--listen", self.address, "--metrics-listen", "127.0.0.1:0",
             "--database-url", f"sqlite://{folder}/idemd.db", "--reaper-interval", "100ms"],
            stderr=subprocess.PIPE, text=True,
        )
        self.log: List[str] = []
        listening = threading.Event()

        def pump() -> None:
            # Keep reading to the end, or idemd would block on a full pipe.
            for line in self.process.stderr:
                self.log.append(line)
                if "idemd listening" in line:
                    listening.set()
            listening.set()

        threading.Thread(target=pump, daemon=True).start()
        if not listening.wait(30) or self.process.poll() is not None:
            self.process.kill()
            raise RuntimeError("idemd did not start:\n" + "".join(self.log))
        self.channel = grpc.insecure_channel(self.address)
        self.stub = pb_grpc.IdempotencyStub(self.channel)
        self.admin = admin_pb2_grpc.AdminStub(self.channel)

    def stop(self) -> None:
        self.channel.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.own_folder:
            shutil.rmtree(self.own_folder, ignore_errors=True)

    def lookup(self, key: str) -> pb.Record:
        return self.stub.Lookup(pb.LookupRequest(namespace=NAMESPACE, key=key), timeout=5).record

    def release(self, key: str, attempt: int) -> None:
        """Ends a running attempt as an operator would (Admin.Release), so its Complete answers LEASE_LOST."""
        self.admin.Release(admin_pb2.ReleaseRequest(
            namespace=NAMESPACE, key=key, attempt=attempt, reason="test: taken over", outcome_unknown=True,
        ), timeout=5)


def new_key(label: str = "order") -> str:
    return f"{label}-{uuid.uuid4()}"


def fp(amount: str = "1000") -> bytes:
    return fingerprint({"amount": amount, "currency": "EUR"})


def ok(body: str) -> Response:
    return Response(body.encode(), 201, "application/json")


class Calls:
    """Counts the idemd calls a client makes, by method name ("Begin", "Heartbeat", ...): a client interceptor
    for the threaded client (``Calls().sync``) and for the asyncio client (``Calls().aio``). ``before`` maps a
    method name to a function called with the request just before it leaves (blocking, even for asyncio)."""

    def __init__(self, before: Optional[Dict[str, Callable[[Any], None]]] = None) -> None:
        self.counts: Dict[str, int] = {}
        self.lock = threading.Lock()
        self.before = before or {}

    def count(self, method, request=None) -> None:
        name = (method.decode() if isinstance(method, bytes) else method).rsplit("/", 1)[-1]
        with self.lock:
            self.counts[name] = self.counts.get(name, 0) + 1
        if name in self.before:
            self.before[name](request)

    def __getitem__(self, name: str) -> int:
        with self.lock:
            return self.counts.get(name, 0)

    @property
    def sync(self) -> grpc.UnaryUnaryClientInterceptor:
        calls = self

        class Counting(grpc.UnaryUnaryClientInterceptor):
            def intercept_unary_unary(self, continuation, details, request):
                calls.count(details.method, request)
                return continuation(details, request)

        return Counting()

    @property
    def aio(self) -> "grpc.aio.UnaryUnaryClientInterceptor":
        import grpc.aio

        calls = self

        class Counting(grpc.aio.UnaryUnaryClientInterceptor):
            async def intercept_unary_unary(self, continuation, details, request):
                calls.count(details.method, request)
                return await continuation(details, request)

        return Counting()


class LostReply(grpc.RpcError):
    """What the caller sees when a reply is lost on the way back (a broken connection): UNAVAILABLE."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "reply lost on the way back"

    def trailing_metadata(self) -> tuple:
        return ()


class CardDeclined(Exception):
    """The caller's own error type for a decline, as a payment SDK would have it."""

    def __init__(self, body: bytes):
        super().__init__(f"card declined: {body!r}")
        self.body = body


def declined_as_error(response: Response) -> Optional[CardDeclined]:
    """A ``final_error`` hook: a stored 402 comes back as ``CardDeclined``."""
    return CardDeclined(response.body) if response.code == 402 else None


def releasing_every_complete(server: Idemd) -> Calls:
    """Releases the lease of every Complete just before it leaves (as an operator would), and counts the calls."""
    return Calls(before={"Complete": lambda request: server.release(request.key, server.lookup(request.key).attempt)})
