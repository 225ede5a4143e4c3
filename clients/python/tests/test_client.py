"""The Python helper against a real idemd (the binary scripts/test built)."""
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import grpc
import pytest

from idemd_client import (
    Client, Final, FingerprintMismatch, InProgress, Response, Retryable, RetryableFailure, entity_key, fingerprint,
)

ROOT = pathlib.Path(__file__).resolve().parents[3]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def idemd():
    binary = os.environ.get("IDEMD_BIN", str(ROOT / "target" / "debug" / "idemd"))
    folder = tempfile.mkdtemp()
    port = free_port()
    process = subprocess.Popen(
        [binary, "serve", "--listen", f"127.0.0.1:{port}", "--metrics-listen", "127.0.0.1:0",
         "--database-url", f"sqlite://{folder}/idemd.db", "--reaper-interval", "100ms"],
        stderr=subprocess.DEVNULL,
    )
    target = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            grpc.channel_ready_future(grpc.insecure_channel(target)).result(timeout=1)
            break
        except grpc.FutureTimeoutError:
            assert time.monotonic() < deadline, "idemd did not start"
    yield target
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)


def client(target, **options):
    defaults = dict(lease_ttl=2.0, wait=2.0, in_progress_budget=15.0)
    defaults.update(options)
    return Client(target, "py-payments", **defaults)


def key():
    return f"order-{uuid.uuid4()}"


def test_vectors_match_the_other_languages():
    # clients/testdata/vectors.json: the same cases every client's tests read.
    vectors = json.loads((pathlib.Path(__file__).parents[2] / "testdata" / "vectors.json").read_text(encoding="utf-8"))
    assert vectors["entity_keys"] and vectors["fingerprints"]
    for case in vectors["entity_keys"]:
        assert entity_key(case["entity"], case["operation"]) == case["key"], case
    for case in vectors["fingerprints"]:
        fields = {name: value.encode() for name, value in case["fields"].items()}
        assert fingerprint(fields).hex() == case["sha256_hex"], case
    assert fingerprint({"currency": b"EUR", "amount": b"1000"}) == fingerprint({"amount": b"1000", "currency": b"EUR"})


def test_first_call_runs_and_a_repeat_replays(idemd):
    c, k, runs = client(idemd), key(), []

    def charge(attempt):
        runs.append(attempt)
        return Response(attempt.downstream_key.encode(), 201, "text/plain")

    first = c.run_once(k, b"fp", charge)
    again = c.run_once(k, b"fp", charge)
    assert (first.replayed, again.replayed, len(runs)) == (False, True, 1)
    assert again.response == first.response and first.response.body.startswith(b"idk_")
    with pytest.raises(FingerprintMismatch):
        c.run_once(k, b"other", charge)


def test_decorator(idemd):
    c, runs = client(idemd), []

    @c.once(key=lambda order, amount: entity_key(order, "charge"),
            fingerprint_of=lambda order, amount: fingerprint({"amount": str(amount).encode()}))
    def charge(attempt, order, amount):
        runs.append(order)
        return Response(f"charged {amount}".encode(), 201)

    order = key()
    assert charge(order, 1000).replayed is False
    assert charge(order, 1000).replayed is True
    assert runs == [order]


def test_concurrent_duplicates_run_it_once(idemd):
    c, k, runs, results = client(idemd), key(), [], []

    def charge(attempt):
        runs.append(1)
        time.sleep(0.2)
        return Response(b"charged", 201)

    threads = [threading.Thread(target=lambda: results.append(c.run_once(k, b"fp", charge))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(runs) == 1 and len(results) == 8
    assert all(r.response.body == b"charged" for r in results)


def test_a_retryable_failure_aborts_and_the_retry_runs_again(idemd):
    c, k, keys = client(idemd), key(), []

    def flaky(attempt):
        keys.append(attempt.downstream_key)
        raise Retryable("provider 503")

    with pytest.raises(RetryableFailure):
        c.run_once(k, b"fp", flaky)
    done = c.run_once(k, b"fp", lambda attempt: keys.append(attempt.downstream_key) or Response(b"ok", 201))
    assert (done.replayed, done.attempt) == (False, 2)
    assert keys[0] == keys[1]


def test_a_final_failure_is_stored_and_replayed(idemd):
    c, k, runs = client(idemd), key(), []
    declined = Response(b'{"error":"card_declined"}', 402, "application/json")

    def decline(attempt):
        runs.append(1)
        raise Final(declined)

    first = c.run_once(k, b"fp", decline)
    assert (first.replayed, first.response) == (False, declined)
    replay = c.run_once(k, b"fp", decline)
    assert replay.replayed and replay.response == declined and len(runs) == 1


def test_a_long_operation_keeps_its_lease_through_heartbeats(idemd):
    c, k, runs = client(idemd, lease_ttl=1.0, in_progress_budget=0.3), key(), []

    def slow(attempt):
        runs.append(1)
        time.sleep(3)
        return Response(b"slow charge", 201)

    result = []
    holder = threading.Thread(target=lambda: result.append(c.run_once(k, b"fp", slow)))
    holder.start()
    for _ in range(5):
        time.sleep(0.5)
        try:
            duplicate = c.run_once(k, b"fp", lambda attempt: runs.append(1) or Response(b"dup"))
            assert duplicate.replayed and duplicate.response.body == b"slow charge"
        except InProgress:
            pass
    holder.join()
    assert result[0].response.body == b"slow charge" and not result[0].replayed
    assert len(runs) == 1


CRASHING_CALLER = """
import sys, time
from idemd_client import Client
c = Client(sys.argv[1], "py-payments", lease_ttl=1.0)
def charge_then_hang(attempt):
    print(attempt.downstream_key, flush=True)
    time.sleep(3600)
c.run_once(sys.argv[2], b"fp", charge_then_hang)
"""


def test_a_crashed_caller_is_recovered_after_its_lease_expires(idemd):
    k = key()
    caller = subprocess.Popen([sys.executable, "-c", CRASHING_CALLER, idemd, k], stdout=subprocess.PIPE, text=True)
    first_key = caller.stdout.readline().strip()
    assert first_key.startswith("idk_")
    caller.send_signal(signal.SIGKILL)  # no Complete, no Abort, no more heartbeats
    caller.wait()
    seen = []
    done = client(idemd, lease_ttl=1.0).run_once(
        k, b"fp", lambda attempt: seen.append(attempt.downstream_key) or Response(b"recovered", 201)
    )
    assert (done.replayed, done.attempt) == (False, 2)
    assert seen == [first_key], "the provider can deduplicate the first charge"
