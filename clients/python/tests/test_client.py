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

from idemd.v1 import idempotency_pb2 as pb
from idemd_client import (
    Client, Final, FingerprintMismatch, InProgress, OutcomeUnknown, OutcomeUnknownFailure, Response, Retryable,
    RetryableFailure, entity_key, fingerprint,
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


def lookup(c, k):
    return c.stub.Lookup(pb.LookupRequest(namespace=c.namespace, key=k)).record


def charge_then_time_out(c, k):
    """Attempt 1 charges and its answer is lost; returns its Attempt."""
    seen = []

    def timeout(attempt):
        seen.append(attempt)
        raise OutcomeUnknown("provider timeout")

    with pytest.raises(OutcomeUnknownFailure):
        c.run_once(k, b"fp", timeout)
    return seen[0]


class Hook:
    """A reconcile hook that records its calls and answers (or raises) ``answer``."""

    def __init__(self, answer):
        self.answer, self.calls = answer, []

    def __call__(self, attempt):
        self.calls.append(attempt)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def test_an_unknown_outcome_is_recorded_and_handed_to_the_next_attempt(idemd):
    c, k, seen = client(idemd), key(), []
    first = charge_then_time_out(c, k)
    assert first.previous is None
    record = lookup(c, k)
    assert (record.state, record.outcome_unknown, record.aborted_by) == (
        pb.STATE_ABORTED, True, pb.ABORTED_BY_CALLER)
    done = c.run_once(k, b"fp", lambda attempt: seen.append(attempt) or Response(b"ch_1", 201))
    assert (done.attempt, done.replayed, done.reconciled) == (2, False, False)
    assert seen[0].downstream_key == first.downstream_key
    previous = seen[0].previous
    assert (previous.attempt, previous.aborted_by, previous.outcome_unknown) == (1, "ABORTED_BY_CALLER", True)
    assert previous.abort_reason == "outcome unknown" and previous.ended_at is not None


def test_after_a_retryable_failure_nothing_is_reconciled(idemd):
    c, k, seen, hook = client(idemd), key(), [], Hook(Response(b"wrong", 201))

    def flaky(attempt):
        seen.append(attempt)
        raise Retryable("provider 503")

    with pytest.raises(RetryableFailure):
        c.run_once(k, b"fp", flaky, reconcile=hook)
    assert lookup(c, k).outcome_unknown is False
    done = c.run_once(k, b"fp", lambda attempt: seen.append(attempt) or Response(b"ch_2", 201), reconcile=hook)
    assert (done.attempt, done.response.body, done.reconciled) == (2, b"ch_2", False)
    assert seen[0].previous is None and seen[1].previous.outcome_unknown is False
    assert hook.calls == [], "the hook runs only after an unknown outcome"


def test_a_reconciled_result_is_stored_without_running_the_operation(idemd):
    c, k, runs, hook = client(idemd), key(), [], Hook(Response(b"ch_3", 201, "text/plain"))
    first = charge_then_time_out(c, k)
    done = c.run_once(k, b"fp", lambda attempt: runs.append(1) or Response(b"second charge", 201), reconcile=hook)
    assert (done.response.body, done.replayed, done.reconciled, done.attempt) == (b"ch_3", False, True, 2)
    assert runs == []
    assert len(hook.calls) == 1 and hook.calls[0].downstream_key == first.downstream_key
    assert (hook.calls[0].previous.attempt, hook.calls[0].previous.outcome_unknown) == (1, True)
    record = lookup(c, k)
    assert (record.state, record.response) == (pb.STATE_COMPLETED, b"ch_3")
    replay = c.run_once(k, b"fp", lambda attempt: Response(b"again"))
    assert replay.replayed and replay.response.body == b"ch_3"


def test_a_declined_card_found_by_the_hook_is_stored(idemd):
    c, k = client(idemd), key()
    declined = Response(b"card_declined", 402, "text/plain")
    charge_then_time_out(c, k)
    hook = Hook(Final(declined))
    done = c.run_once(k, b"fp", lambda attempt: Response(b"second charge", 201), reconcile=hook)
    assert (done.response, done.reconciled) == (declined, True)


def test_when_the_hook_finds_nothing_the_operation_runs(idemd):
    c, k, seen, hook = client(idemd), key(), [], Hook(None)
    charge_then_time_out(c, k)
    done = c.run_once(k, b"fp", lambda attempt: seen.append(attempt) or Response(b"ch_4", 201), reconcile=hook)
    assert (done.response.body, done.reconciled, done.attempt) == (b"ch_4", False, 2)
    assert len(hook.calls) == 1 and seen[0].previous.outcome_unknown, "the operation sees it too"


def test_a_failed_hook_leaves_the_outcome_unknown(idemd):
    c, k, runs = client(idemd), key(), []
    charge_then_time_out(c, k)
    failing = Hook(ConnectionError("lookup 503"))
    with pytest.raises(OutcomeUnknownFailure) as raised:
        c.run_once(k, b"fp", lambda attempt: runs.append(1) or Response(b"second charge", 201), reconcile=failing)
    assert isinstance(raised.value.__cause__, ConnectionError)
    assert runs == [], "no charge while the first one may exist"
    record = lookup(c, k)
    assert (record.state, record.attempt, record.outcome_unknown) == (pb.STATE_ABORTED, 2, True)
    hook = Hook(Response(b"ch_5", 201))
    done = c.run_once(k, b"fp", lambda attempt: Response(b"second charge", 201), reconcile=hook)
    assert (done.response.body, done.reconciled, done.attempt) == (b"ch_5", True, 3)
    assert (hook.calls[0].previous.attempt, hook.calls[0].previous.outcome_unknown) == (2, True)


def test_a_retryable_failure_keeps_an_unreconciled_unknown_outcome(idemd):
    c, k = client(idemd), key()
    charge_then_time_out(c, k)

    def flaky(attempt):
        raise Retryable("503")

    # Without a hook nobody checked attempt 1: the record must keep saying so.
    with pytest.raises(OutcomeUnknownFailure):
        c.run_once(k, b"fp", flaky)
    record = lookup(c, k)
    assert (record.attempt, record.outcome_unknown) == (2, True)
    # With a hook that found nothing, the retryable failure is just that.
    hook = Hook(None)
    with pytest.raises(RetryableFailure):
        c.run_once(k, b"fp", flaky, reconcile=hook)
    record = lookup(c, k)
    assert (len(hook.calls), record.attempt, record.outcome_unknown) == (1, 3, False)


def test_an_expired_lease_is_reconciled(idemd):
    k = key()
    caller = subprocess.Popen([sys.executable, "-c", CRASHING_CALLER, idemd, k], stdout=subprocess.PIPE, text=True)
    assert caller.stdout.readline().strip().startswith("idk_")
    caller.send_signal(signal.SIGKILL)
    caller.wait()
    hook = Hook(Response(b"ch_7", 201))
    done = client(idemd, lease_ttl=1.0).run_once(k, b"fp", lambda attempt: Response(b"second charge"), reconcile=hook)
    assert (done.response.body, done.reconciled, done.attempt) == (b"ch_7", True, 2)
    previous = hook.calls[0].previous
    assert (previous.aborted_by, previous.abort_reason, previous.outcome_unknown) == (
        "ABORTED_BY_REAPER", "lease expired", True)


def test_the_decorator_takes_a_reconcile_hook(idemd):
    c, calls = client(idemd), []

    @c.once(key=lambda order: order, fingerprint_of=lambda order: b"fp",
            reconcile=lambda attempt, order: calls.append(order) or Response(f"found {order}".encode(), 201))
    def charge(attempt, order):
        raise OutcomeUnknown("provider timeout")

    order = key()
    with pytest.raises(OutcomeUnknownFailure):
        charge(order)
    done = charge(order)
    assert (done.response.body, done.reconciled, calls) == (f"found {order}".encode(), True, [order])
