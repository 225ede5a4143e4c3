"""The asyncio client against a real idemd: one test per scenario of clients/testdata/conformance.json, named
test_aio_ + its id. Each test runs its own event loop (asyncio.run), with clients made inside it."""
import asyncio
import re
from datetime import datetime, timezone

import grpc
import grpc.aio
import pytest

from helpers import NAMESPACE, CardDeclined, Calls, Idemd, LostReply, declined_as_error, fp, free_address, new_key
from helpers import ok, releasing_every_complete, shared
from idemd.v1 import idempotency_pb2 as pb
from idemd_client.aio import (
    Client, Final, FingerprintMismatch, IdemdError, InProgress, InvalidArgument, LeaseLost, OutcomeUnknown,
    OutcomeUnknownFailure, Response, Retryable, RetryableFailure, Unavailable, entity_key, fingerprint,
)

ERRORS = [FingerprintMismatch, InProgress, InvalidArgument, LeaseLost, OutcomeUnknownFailure, RetryableFailure,
          Unavailable]


def client(server, **options):
    settings = dict(lease_ttl=2.0, wait=2.0, in_progress_budget=15.0)
    settings.update(options)
    return Client(server.address, NAMESPACE, **settings)


def only(error, kind):
    assert isinstance(error, kind) and isinstance(error, IdemdError), error
    assert [other for other in ERRORS if other is not kind and isinstance(error, other)] == [], error


def run(main):
    """Runs a test's coroutine on a fresh loop."""
    return asyncio.run(main())


class Runs(list):
    def add(self, attempt):
        self.append(attempt)
        return len(self)


def test_aio_first_run_stores_and_replays(server):
    async def main():
        key, runs = new_key(), Runs()

        async def charge(attempt):
            runs.add(attempt)
            await asyncio.sleep(0)
            return ok('{"charge":"ch_1"}')

        async with client(server) as c:
            first = await c.run_once(key, fp(), charge)
            second = await c.run_once(key, fp(), charge)
        assert (first.replayed, first.reconciled, first.attempt) == (False, False, 1)
        assert first.response == Response(b'{"charge":"ch_1"}', 201, "application/json")
        assert runs[0].attempt == 1 and runs[0].previous is None
        assert re.fullmatch(r"idk_[0-9a-f]{32}", runs[0].downstream_key)
        assert (second.replayed, second.attempt, second.response) == (True, 1, first.response)
        assert len(runs) == 1
        record = server.lookup(key)
        assert (record.state, record.downstream_key) == (pb.STATE_COMPLETED, runs[0].downstream_key)

    run(main)


def test_aio_concurrent_duplicate_waits_for_the_stored_response(server):
    async def main():
        key, runs, started, release = new_key(), Runs(), asyncio.Event(), asyncio.Event()

        async def charge(attempt):
            if runs.add(attempt) == 1:
                started.set()
            await release.wait()
            return ok('{"charge":"ch_dup"}')

        calls = Calls()
        async with client(server) as first, client(server, wait=10.0, interceptors=[calls.aio]) as second:
            holder = asyncio.ensure_future(first.run_once(key, fp(), charge))
            await asyncio.wait_for(started.wait(), 10)
            # A wait longer than the holder takes: one Begin waits server-side, woken by the holder's Complete.
            waiter = asyncio.ensure_future(second.run_once(key, fp(), charge))
            await asyncio.sleep(0.3)
            release.set()
            held, waited = await asyncio.wait_for(asyncio.gather(holder, waiter), 15)
        assert not held.replayed and waited.replayed
        assert waited.response.body == b'{"charge":"ch_dup"}' and waited.attempt == 1
        assert len(runs) == 1 and calls["Begin"] == 1

    run(main)


def test_aio_final_failure_is_stored_and_replayed(server):
    async def main():
        key, runs = new_key(), Runs()
        declined = Response(b'{"error":"card_declined"}', 402, "application/json")

        async def decline(attempt):
            runs.add(attempt)
            raise Final(declined)

        async with client(server) as c:
            first = await c.run_once(key, fp(), decline)
            assert (first.replayed, first.response) == (False, declined)
            record = server.lookup(key)
            assert (record.state, record.response_code) == (pb.STATE_COMPLETED, 402)
            for _ in range(2):
                with pytest.raises(CardDeclined) as raised:
                    await c.run_once(key, fp(), decline, final_error=declined_as_error)
                assert raised.value.body == declined.body
            assert (await c.run_once(key, fp(), decline)).response == declined
        assert len(runs) == 1

    run(main)


def test_aio_retryable_failure_is_aborted_and_rerun(server):
    async def main():
        key, runs = new_key(), Runs()
        unavailable = ConnectionError("provider answered 503")

        async def flaky(attempt):
            runs.add(attempt)
            raise Retryable(unavailable)

        async def charge(attempt):
            runs.add(attempt)
            return ok('{"charge":"ch_2"}')

        async with client(server) as c:
            with pytest.raises(RetryableFailure) as raised:
                await c.run_once(key, fp(), flaky)
            only(raised.value, RetryableFailure)
            assert raised.value.__cause__ is unavailable
            assert (raised.value.key, raised.value.attempt) == (key, 1)
            record = server.lookup(key)
            assert (record.state, record.outcome_unknown, record.aborted_by) == (
                pb.STATE_ABORTED, False, pb.ABORTED_BY_CALLER)
            done = await c.run_once(key, fp(), charge)
        assert (done.attempt, done.replayed, runs[1].attempt) == (2, False, 2)
        assert (runs[1].previous.attempt, runs[1].previous.outcome_unknown) == (1, False)
        assert runs[1].downstream_key == runs[0].downstream_key

    run(main)


def test_aio_unknown_outcome_is_aborted_as_unknown(server):
    async def main():
        key, runs = new_key(), Runs()
        timeout = TimeoutError("provider did not answer within 10 s")

        async def charge(attempt):
            runs.add(attempt)
            raise OutcomeUnknown(timeout)

        async with client(server) as c:
            with pytest.raises(OutcomeUnknownFailure) as raised:
                await c.run_once(key, fp(), charge)
            only(raised.value, OutcomeUnknownFailure)
            assert raised.value.__cause__ is timeout
            record = server.lookup(key)
            assert (record.state, record.outcome_unknown) == (pb.STATE_ABORTED, True)
            await c.run_once(key, fp(), lambda attempt: runs.add(attempt) and ok("{}"))
        previous = runs[1].previous
        assert (previous.attempt, previous.aborted_by, previous.outcome_unknown) == (1, "ABORTED_BY_CALLER", True)
        assert previous.abort_reason == "outcome unknown" and previous.ended_at <= datetime.now(timezone.utc)

    run(main)


def test_aio_reconcile_hook_completes_without_running(server):
    async def main():
        async def timeout(attempt):
            raise OutcomeUnknown("timeout after sending")

        async def unknown_first(c, key):
            with pytest.raises(OutcomeUnknownFailure):
                await c.run_once(key, fp(), timeout, reconcile=lambda attempt: pytest.fail("the hook ran on attempt 1"))

        def operation(runs, body):
            async def charge(attempt):
                runs.add(attempt)
                return ok(body)
            return charge

        async with client(server) as c:
            # Found: stored without running the operation.
            key, runs, asked = new_key(), Runs(), Runs()
            await unknown_first(c, key)

            async def found(attempt):
                asked.add(attempt)
                return ok('{"charge":"ch_found"}')

            done = await c.run_once(key, fp(), operation(runs, '{"charge":"ch_second"}'), reconcile=found)
            assert (done.reconciled, done.replayed, done.attempt) == (True, False, 2)
            assert done.response.body == b'{"charge":"ch_found"}' and len(runs) == 0
            assert len(asked) == 1 and asked[0].previous.outcome_unknown
            replayed = await c.run_once(key, fp(), operation(runs, "{}"), reconcile=found)
            assert replayed.replayed and replayed.response.body == b'{"charge":"ch_found"}' and len(runs) == 0
            # None: the operation runs.
            key, runs, asked = new_key(), Runs(), Runs()
            await unknown_first(c, key)

            async def nothing(attempt):
                asked.add(attempt)
                return None

            done = await c.run_once(key, fp(), operation(runs, '{"charge":"ch_ran"}'), reconcile=nothing)
            assert (done.reconciled, done.attempt, len(runs), len(asked)) == (False, 2, 1, 1)
            # The hook fails: still outcome-unknown, nothing ran.
            key, runs = new_key(), Runs()
            await unknown_first(c, key)
            down = ConnectionError("provider search unavailable")

            async def failing(attempt):
                raise down

            with pytest.raises(OutcomeUnknownFailure) as raised:
                await c.run_once(key, fp(), operation(runs, "{}"), reconcile=failing)
            assert raised.value.__cause__ is down and len(runs) == 0
            record = server.lookup(key)
            assert (record.state, record.outcome_unknown, record.attempt) == (pb.STATE_ABORTED, True, 2)

    run(main)


def test_aio_lost_begin_reply_retried_with_the_same_nonce_gets_the_same_lease(server):
    async def main():
        begins = []

        class LoseFirstReply(grpc.aio.UnaryUnaryClientInterceptor):
            # The first Begin reaches idemd, which acquires; its reply is then dropped.
            async def intercept_unary_unary(self, continuation, details, request):
                call = await continuation(details, request)
                if details.method.endswith(b"/Begin"):
                    reply = await call
                    begins.append((request.attempt_nonce, reply.acquired.lease_token, reply.acquired.attempt))
                    if len(begins) == 1:
                        raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                                                   grpc.aio.Metadata(), details=LostReply().details())
                return call

        key, runs = new_key(), Runs()
        async with client(server, interceptors=[LoseFirstReply()]) as c:
            done = await c.run_once(key, fp(), lambda attempt: runs.add(attempt) and ok('{"charge":"ch_nonce"}'))
        assert len(begins) == 2, "the lost Begin and its retry"
        (nonce, token, attempt), retried = begins
        assert nonce and token and attempt == 1
        assert retried == (nonce, token, 1), "the same nonce gets the same lease"
        assert (done.attempt, len(runs)) == (1, 1)
        record = server.lookup(key)
        assert (record.state, record.attempt) == (pb.STATE_COMPLETED, 1)

    run(main)


def test_aio_heartbeats_keep_a_long_operation_alive(server):
    async def main():
        calls, key, seen = Calls(), new_key(), {}

        async def long_charge(attempt):
            await asyncio.sleep(1.8)
            # Past the 1 s TTL (and the 100 ms reaper) the lease is still ours.
            seen["midway"], seen["at"] = server.lookup(key), datetime.now(timezone.utc)
            async with client(server, wait=0, in_progress_budget=0) as intruder:
                with pytest.raises(InProgress) as busy:
                    await intruder.run_once(key, fp(), lambda a: ok('{"charge":"ch_intruder"}'))
            seen["busy"] = busy.value
            await asyncio.sleep(0.7)
            return ok('{"charge":"ch_long"}')

        async with client(server, lease_ttl=1.0, interceptors=[calls.aio]) as c:
            done = await c.run_once(key, fp(), long_charge)
            returned = calls["Heartbeat"]
            # The heartbeat task ended with the call.
            await asyncio.sleep(1.0)
            assert returned >= 2 and calls["Heartbeat"] == returned
        midway = seen["midway"]
        assert (midway.state, midway.attempt) == (pb.STATE_IN_PROGRESS, 1)
        assert midway.lease_expires_at.ToDatetime(tzinfo=timezone.utc) > seen["at"]
        only(seen["busy"], InProgress)
        assert (done.attempt, done.replayed, done.response.body) == (1, False, b'{"charge":"ch_long"}')
        record = server.lookup(key)
        assert (record.state, record.attempt) == (pb.STATE_COMPLETED, 1)

    run(main)


def test_aio_lease_lost_begins_again_and_replays_the_winner(server):
    async def main():
        key, runs, taken, finish = new_key(), Runs(), asyncio.Event(), asyncio.Event()

        async def slow(attempt):
            runs.add(attempt)
            taken.set()
            await finish.wait()
            return ok('{"charge":"ch_loser"}')

        async with client(server) as loser, client(server) as other:
            running = asyncio.ensure_future(loser.run_once(key, fp(), slow))
            await asyncio.wait_for(taken.wait(), 10)
            server.release(key, 1)
            winner = await other.run_once(key, fp(), lambda attempt: ok('{"charge":"ch_winner"}'))
            assert winner.attempt == 2 and not winner.replayed
            finish.set()
            done = await asyncio.wait_for(running, 15)
        assert (done.replayed, done.response.body, done.attempt, len(runs)) == (True, b'{"charge":"ch_winner"}', 2, 1)

    run(main)


def test_aio_lease_lost_begins_again_and_stores_the_response_it_has(server):
    # Nobody else stored a result: Begin hands this call the record again (attempt 2), and the response it
    # already has is stored there without running the operation again.
    async def main():
        key, runs = new_key(), Runs()

        async def charge(attempt):
            runs.add(attempt)
            server.release(key, attempt.attempt)
            return ok('{"charge":"ch_mine"}')

        async with client(server) as c:
            done = await c.run_once(key, fp(), charge)
        assert (done.attempt, done.replayed, done.response.body, len(runs)) == (2, False, b'{"charge":"ch_mine"}', 1)
        record = server.lookup(key)
        assert (record.state, record.attempt, record.response) == (pb.STATE_COMPLETED, 2, b'{"charge":"ch_mine"}')

    run(main)


def test_aio_lease_lost_begins_again_at_most_twice(server):
    async def main():
        key, runs, calls = new_key(), Runs(), releasing_every_complete(server)
        async with Client(server.address, NAMESPACE, interceptors=[calls.aio]) as c:
            with pytest.raises(LeaseLost) as raised:
                await c.run_once(key, fp(), lambda attempt: runs.add(attempt) and ok("{}"))
        only(raised.value, LeaseLost)
        assert (raised.value.reason, raised.value.code, raised.value.attempt) == (
            "LEASE_LOST", grpc.StatusCode.FAILED_PRECONDITION, 3)
        assert isinstance(raised.value.__cause__, grpc.RpcError)
        assert (len(runs), calls["Begin"], calls["Complete"]) == (1, 3, 3)

    run(main)


def test_aio_fingerprint_mismatch_is_its_own_error(server):
    async def main():
        key, runs = new_key(), Runs()
        async with client(server) as c:
            await c.run_once(key, fp("1000"), lambda attempt: runs.add(attempt) and ok("{}"))
            with pytest.raises(FingerprintMismatch) as raised:
                await c.run_once(key, fp("9999"), lambda attempt: runs.add(attempt) and ok("{}"))
        only(raised.value, FingerprintMismatch)
        error = raised.value
        assert (error.reason, error.code, error.key) == (
            "FINGERPRINT_MISMATCH", grpc.StatusCode.FAILED_PRECONDITION, key)
        assert isinstance(error.__cause__, grpc.RpcError) and key in str(error)
        assert len(runs) == 1

    run(main)


async def expect_unavailable(address):
    calls = Calls()
    async with Client(address, NAMESPACE, rpc_retries=3, rpc_timeout=2.0, interceptors=[calls.aio]) as c:
        with pytest.raises(Unavailable) as raised:
            await c.run_once(new_key(), fp(), lambda attempt: pytest.fail("the operation ran without idemd"))
    only(raised.value, Unavailable)
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE and isinstance(raised.value.__cause__, grpc.RpcError)
    assert calls["Begin"] == 4, "1 Begin + 3 retries"


def test_aio_unavailable_is_retried_then_surfaced_for_an_unreachable_address():
    run(lambda: expect_unavailable("http://" + free_address()))


def test_aio_unavailable_is_retried_then_surfaced_for_a_stopped_server():
    own = Idemd()

    async def main():
        try:
            async with Client(own.address, NAMESPACE) as c:
                assert (await c.run_once(new_key(), fp(), lambda attempt: ok("{}"))).attempt == 1
        finally:
            own.stop()
        await expect_unavailable(own.address)

    run(main)


def test_aio_keys_and_fingerprints_match_the_shared_vectors():
    # idemd_client.aio exports the same helpers as idemd_client.
    import idemd_client

    assert (entity_key, fingerprint) == (idemd_client.entity_key, idemd_client.fingerprint)
    vectors = shared("vectors.json")
    for case in vectors["entity_keys"]:
        assert entity_key(case["entity"], case["operation"]) == case["key"], case
    for case in vectors["fingerprints"]:
        assert fingerprint(case["fields"]).hex() == case["sha256_hex"], case
