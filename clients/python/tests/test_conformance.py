"""The threaded client against a real idemd: one test per scenario of clients/testdata/conformance.json, named
after its id (test_aio_conformance.py has the same for the asyncio client)."""
import re
import threading
import time
from datetime import datetime, timezone

import grpc
import pytest

from helpers import NAMESPACE, CardDeclined, Calls, Idemd, LostReply, declined_as_error, fp, free_address, new_key
from helpers import ok, releasing_every_complete, shared
from idemd.v1 import idempotency_pb2 as pb
from idemd_client import (
    Client, Final, FingerprintMismatch, IdemdError, InProgress, InvalidArgument, LeaseLost, OutcomeUnknown,
    OutcomeUnknownFailure, Response, Retryable, RetryableFailure, Unavailable, entity_key, fingerprint,
)

ERRORS = [FingerprintMismatch, InProgress, InvalidArgument, LeaseLost, OutcomeUnknownFailure, RetryableFailure,
          Unavailable]


def client(server, **options):
    """A client of the shared idemd with short leases and waits, so that the tests that wait on them stay short."""
    settings = dict(lease_ttl=2.0, wait=2.0, in_progress_budget=15.0)
    settings.update(options)
    return Client(server.address, NAMESPACE, **settings)


def only(error, kind):
    """``error`` is a ``kind`` and no other outcome's error."""
    assert isinstance(error, kind) and isinstance(error, IdemdError), error
    assert [other for other in ERRORS if other is not kind and isinstance(error, other)] == [], error


class Runs:
    """An operation's runs, from any thread."""

    def __init__(self):
        self.attempts, self.lock = [], threading.Lock()

    def add(self, attempt):
        with self.lock:
            self.attempts.append(attempt)
            return len(self.attempts)

    def __len__(self):
        with self.lock:
            return len(self.attempts)


def test_first_run_stores_and_replays(server):
    c, key, runs = client(server), new_key(), Runs()

    def charge(attempt):
        runs.add(attempt)
        return ok('{"charge":"ch_1"}')

    first = c.run_once(key, fp(), charge)
    assert (first.replayed, first.reconciled, first.attempt) == (False, False, 1)
    assert first.response == Response(b'{"charge":"ch_1"}', 201, "application/json")
    attempt = runs.attempts[0]
    assert attempt.attempt == 1 and attempt.previous is None
    assert re.fullmatch(r"idk_[0-9a-f]{32}", attempt.downstream_key)
    second = c.run_once(key, fp(), charge)
    assert (second.replayed, second.attempt, second.response) == (True, 1, first.response)
    assert len(runs) == 1
    record = server.lookup(key)
    assert (record.state, record.downstream_key) == (pb.STATE_COMPLETED, attempt.downstream_key)


def test_concurrent_duplicate_waits_for_the_stored_response(server):
    key, runs, started, release, results = new_key(), Runs(), threading.Event(), threading.Event(), {}

    def charge(attempt):
        if runs.add(attempt) == 1:
            started.set()
        release.wait(10)
        return ok('{"charge":"ch_dup"}')

    holder = threading.Thread(target=lambda: results.update(holder=client(server).run_once(key, fp(), charge)))
    holder.start()
    assert started.wait(10)
    # A wait longer than the holder takes: one Begin waits server-side and is woken by the holder's Complete.
    calls = Calls()
    second = client(server, wait=10.0, interceptors=[calls.sync])
    waiter = threading.Thread(target=lambda: results.update(waiter=second.run_once(key, fp(), charge)))
    waiter.start()
    time.sleep(0.3)
    release.set()
    holder.join(15)
    waiter.join(15)
    held, waited = results["holder"], results["waiter"]
    assert not held.replayed and waited.replayed
    assert waited.response.body == b'{"charge":"ch_dup"}' and waited.attempt == 1
    assert len(runs) == 1 and calls["Begin"] == 1


def test_final_failure_is_stored_and_replayed(server):
    c, key, runs = client(server), new_key(), Runs()
    declined = Response(b'{"error":"card_declined"}', 402, "application/json")

    def decline(attempt):
        runs.add(attempt)
        raise Final(declined)

    first = c.run_once(key, fp(), decline)
    assert (first.replayed, first.response) == (False, declined)
    record = server.lookup(key)
    assert (record.state, record.response_code) == (pb.STATE_COMPLETED, 402)
    # Every later run gets the same final failure, as the caller's own error type when asked for it.
    for _ in range(2):
        with pytest.raises(CardDeclined) as raised:
            c.run_once(key, fp(), decline, final_error=declined_as_error)
        assert raised.value.body == declined.body
    assert c.run_once(key, fp(), decline).response == declined
    assert len(runs) == 1


def test_retryable_failure_is_aborted_and_rerun(server):
    c, key, runs = client(server), new_key(), Runs()
    unavailable = ConnectionError("provider answered 503")

    def flaky(attempt):
        runs.add(attempt)
        raise Retryable(unavailable)

    with pytest.raises(RetryableFailure) as raised:
        c.run_once(key, fp(), flaky)
    only(raised.value, RetryableFailure)
    assert raised.value.__cause__ is unavailable, "the cause is kept"
    assert (raised.value.key, raised.value.attempt) == (key, 1)
    assert key in str(raised.value) and "provider answered 503" in str(raised.value)
    record = server.lookup(key)
    assert (record.state, record.outcome_unknown, record.aborted_by) == (pb.STATE_ABORTED, False, pb.ABORTED_BY_CALLER)
    done = c.run_once(key, fp(), lambda attempt: runs.add(attempt) and ok('{"charge":"ch_2"}'))
    second = runs.attempts[1]
    assert (done.attempt, done.replayed, second.attempt) == (2, False, 2)
    assert (second.previous.attempt, second.previous.outcome_unknown) == (1, False)
    assert second.downstream_key == runs.attempts[0].downstream_key


def test_unknown_outcome_is_aborted_as_unknown(server):
    c, key, runs = client(server), new_key(), Runs()
    timeout = TimeoutError("provider did not answer within 10 s")

    def charge(attempt):
        runs.add(attempt)
        raise OutcomeUnknown("provider timeout") from timeout

    with pytest.raises(OutcomeUnknownFailure) as raised:
        c.run_once(key, fp(), charge)
    only(raised.value, OutcomeUnknownFailure)
    assert raised.value.__cause__ is timeout
    record = server.lookup(key)
    assert (record.state, record.outcome_unknown) == (pb.STATE_ABORTED, True)
    c.run_once(key, fp(), lambda attempt: runs.add(attempt) and ok("{}"))
    previous = runs.attempts[1].previous
    assert (previous.attempt, previous.aborted_by, previous.outcome_unknown) == (1, "ABORTED_BY_CALLER", True)
    assert previous.abort_reason == "outcome unknown" and previous.ended_at <= datetime.now(timezone.utc)


def unknown_first(c, key):
    """Attempt 1 of ``key`` times out at the provider (which may have charged)."""
    def timeout(attempt):
        raise OutcomeUnknown("timeout after sending")

    with pytest.raises(OutcomeUnknownFailure):
        c.run_once(key, fp(), timeout, reconcile=lambda attempt: pytest.fail("the hook ran on attempt 1"))


def test_reconcile_hook_completes_without_running(server):
    c = client(server)
    # Found: the provider holds attempt 1's charge; it is stored and the operation does not run.
    key, runs, asked = new_key(), Runs(), Runs()
    unknown_first(c, key)
    hook = lambda attempt: asked.add(attempt) and ok('{"charge":"ch_found"}')  # noqa: E731
    done = c.run_once(key, fp(), lambda attempt: runs.add(attempt) and ok('{"charge":"ch_second"}'), reconcile=hook)
    assert (done.reconciled, done.replayed, done.attempt) == (True, False, 2)
    assert done.response.body == b'{"charge":"ch_found"}' and len(runs) == 0
    assert len(asked) == 1 and asked.attempts[0].previous.outcome_unknown
    replayed = c.run_once(key, fp(), lambda attempt: runs.add(attempt) and ok("{}"), reconcile=hook)
    assert replayed.replayed and replayed.response.body == b'{"charge":"ch_found"}' and len(runs) == 0
    # None: nothing was charged; the operation runs.
    key, runs, asked = new_key(), Runs(), Runs()
    unknown_first(c, key)
    done = c.run_once(key, fp(), lambda attempt: runs.add(attempt) and ok('{"charge":"ch_ran"}'),
                      reconcile=lambda attempt: asked.add(attempt) and None)
    assert (done.reconciled, done.attempt, len(runs), len(asked)) == (False, 2, 1, 1)
    # The hook fails: the question stays open for the next attempt, and nothing runs.
    key, runs = new_key(), Runs()
    unknown_first(c, key)
    down = ConnectionError("provider search unavailable")

    def failing(attempt):
        raise down

    with pytest.raises(OutcomeUnknownFailure) as raised:
        c.run_once(key, fp(), lambda attempt: runs.add(attempt) and ok("{}"), reconcile=failing)
    assert raised.value.__cause__ is down and len(runs) == 0
    record = server.lookup(key)
    assert (record.state, record.outcome_unknown, record.attempt) == (pb.STATE_ABORTED, True, 2)


def test_lost_begin_reply_retried_with_the_same_nonce_gets_the_same_lease(server):
    begins = []

    class LoseFirstReply(grpc.UnaryUnaryClientInterceptor):
        # The first Begin reaches idemd, which acquires; its reply is then dropped, as a broken connection would.
        def intercept_unary_unary(self, continuation, details, request):
            outcome = continuation(details, request)
            if details.method.endswith("/Begin"):
                reply = outcome.result()
                begins.append((request.attempt_nonce, reply.acquired.lease_token, reply.acquired.attempt))
                if len(begins) == 1:
                    raise LostReply()
            return outcome

    c, key, runs = client(server, interceptors=[LoseFirstReply()]), new_key(), Runs()
    done = c.run_once(key, fp(), lambda attempt: runs.add(attempt) and ok('{"charge":"ch_nonce"}'))
    assert len(begins) == 2, "the lost Begin and its retry"
    (nonce, token, attempt), retried = begins
    assert nonce and token and attempt == 1
    assert retried == (nonce, token, 1), "the same nonce gets the same lease"
    assert (done.attempt, len(runs)) == (1, 1)
    # The retried Begin's lease completed: no orphan lease, no attempt 2.
    record = server.lookup(key)
    assert (record.state, record.attempt) == (pb.STATE_COMPLETED, 1)


def test_heartbeats_keep_a_long_operation_alive(server):
    calls, key, seen = Calls(), new_key(), {}
    c = client(server, lease_ttl=1.0, interceptors=[calls.sync])

    def long_charge(attempt):
        time.sleep(1.8)
        # Past the 1 s TTL (and the 100 ms reaper) the lease is still ours.
        seen["midway"], seen["at"] = server.lookup(key), datetime.now(timezone.utc)
        with pytest.raises(InProgress) as busy:
            client(server, wait=0, in_progress_budget=0).run_once(key, fp(), lambda a: ok('{"charge":"ch_intruder"}'))
        seen["busy"] = busy.value
        time.sleep(0.7)
        return ok('{"charge":"ch_long"}')

    done = c.run_once(key, fp(), long_charge)
    returned = calls["Heartbeat"]
    midway = seen["midway"]
    assert (midway.state, midway.attempt) == (pb.STATE_IN_PROGRESS, 1)
    assert midway.lease_expires_at.ToDatetime(tzinfo=timezone.utc) > seen["at"]
    only(seen["busy"], InProgress)
    assert (done.attempt, done.replayed, done.response.body) == (1, False, b'{"charge":"ch_long"}')
    record = server.lookup(key)
    assert (record.state, record.attempt) == (pb.STATE_COMPLETED, 1)
    # The heartbeats ended with the call.
    time.sleep(1.0)
    assert returned >= 2 and calls["Heartbeat"] == returned


def test_lease_lost_begins_again_and_replays_the_winner(server):
    key, runs, taken, finish, result = new_key(), Runs(), threading.Event(), threading.Event(), {}

    def slow(attempt):
        runs.add(attempt)
        taken.set()
        finish.wait(10)
        return ok('{"charge":"ch_loser"}')

    loser = threading.Thread(target=lambda: result.update(done=client(server).run_once(key, fp(), slow)))
    loser.start()
    assert taken.wait(10)
    server.release(key, 1)
    winner = client(server).run_once(key, fp(), lambda attempt: ok('{"charge":"ch_winner"}'))
    assert winner.attempt == 2 and not winner.replayed
    finish.set()
    loser.join(15)
    done = result["done"]
    assert (done.replayed, done.response.body, done.attempt, len(runs)) == (True, b'{"charge":"ch_winner"}', 2, 1)


def test_lease_lost_begins_again_and_stores_the_response_it_has(server):
    # Nobody else stored a result: Begin hands this call the record again (attempt 2), and the response it
    # already has is stored there without running the operation again.
    key, runs = new_key(), Runs()

    def charge(attempt):
        runs.add(attempt)
        server.release(key, attempt.attempt)
        return ok('{"charge":"ch_mine"}')

    done = client(server).run_once(key, fp(), charge)
    assert (done.attempt, done.replayed, done.response.body, len(runs)) == (2, False, b'{"charge":"ch_mine"}', 1)
    record = server.lookup(key)
    assert (record.state, record.attempt, record.response) == (pb.STATE_COMPLETED, 2, b'{"charge":"ch_mine"}')


def test_lease_lost_begins_again_at_most_twice(server):
    key, runs, calls = new_key(), Runs(), releasing_every_complete(server)
    c = Client(server.address, NAMESPACE, interceptors=[calls.sync])
    with pytest.raises(LeaseLost) as raised:
        c.run_once(key, fp(), lambda attempt: runs.add(attempt) and ok("{}"))
    c.close()
    only(raised.value, LeaseLost)
    assert (raised.value.reason, raised.value.code, raised.value.attempt) == (
        "LEASE_LOST", grpc.StatusCode.FAILED_PRECONDITION, 3)
    assert isinstance(raised.value.__cause__, grpc.RpcError)
    assert (len(runs), calls["Begin"], calls["Complete"]) == (1, 3, 3)


def test_fingerprint_mismatch_is_its_own_error(server):
    c, key, runs = client(server), new_key(), Runs()
    c.run_once(key, fp("1000"), lambda attempt: runs.add(attempt) and ok("{}"))
    with pytest.raises(FingerprintMismatch) as raised:
        c.run_once(key, fp("9999"), lambda attempt: runs.add(attempt) and ok("{}"))
    only(raised.value, FingerprintMismatch)
    error = raised.value
    assert (error.reason, error.code, error.key) == ("FINGERPRINT_MISMATCH", grpc.StatusCode.FAILED_PRECONDITION, key)
    assert isinstance(error.__cause__, grpc.RpcError) and key in str(error) and "fingerprint" in str(error)
    assert len(runs) == 1


def expect_unavailable(address):
    calls = Calls()
    c = Client(address, NAMESPACE, rpc_retries=3, rpc_timeout=2.0, interceptors=[calls.sync])
    with pytest.raises(Unavailable) as raised:
        c.run_once(new_key(), fp(), lambda attempt: pytest.fail("the operation ran without idemd"))
    c.close()
    only(raised.value, Unavailable)
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE and isinstance(raised.value.__cause__, grpc.RpcError)
    assert calls["Begin"] == 4, "1 Begin + 3 retries"


def test_unavailable_is_retried_then_surfaced_for_an_unreachable_address():
    expect_unavailable("http://" + free_address())


def test_unavailable_is_retried_then_surfaced_for_a_stopped_server():
    own = Idemd()
    try:
        assert Client(own.address, NAMESPACE).run_once(new_key(), fp(), lambda attempt: ok("{}")).attempt == 1
    finally:
        own.stop()
    expect_unavailable(own.address)


def test_keys_and_fingerprints_match_the_shared_vectors():
    vectors = shared("vectors.json")
    assert vectors["entity_keys"] and vectors["fingerprints"]
    for case in vectors["entity_keys"]:
        assert entity_key(case["entity"], case["operation"]) == case["key"], case
    for case in vectors["fingerprints"]:
        assert fingerprint(case["fields"]).hex() == case["sha256_hex"], case
        # Text is taken as UTF-8: bytes give the same fingerprint.
        as_bytes = {name: value.encode() for name, value in case["fields"].items()}
        assert fingerprint(as_bytes).hex() == case["sha256_hex"], case
    assert fingerprint({"a": "bc"}) != fingerprint({"ab": "c"}), "concatenation collides"


def test_every_conformance_scenario_has_a_test_in_both_clients():
    import test_aio_conformance
    import test_conformance

    scenarios = [scenario["id"] for scenario in shared("conformance.json")["scenarios"]]
    assert scenarios
    for module, prefix in ((test_conformance, "test_"), (test_aio_conformance, "test_aio_")):
        names = [name for name in dir(module) if name.startswith("test_")]
        missing = [s for s in scenarios if not any(name.startswith(prefix + s) for name in names)]
        assert missing == [], f"{module.__name__} has no test for {missing}"
