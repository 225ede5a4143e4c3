"""The rules beyond the conformance list, for both clients (each test runs as [threaded] and [aio]): the lease
always ends, whatever the operation raises or returns; bodies; the caller's own error for a final failure;
validation before any call; the per-call knobs; how idemd's errors are mapped."""
import asyncio
import functools
import inspect
import sys
import threading
from datetime import timedelta

import grpc
import pytest

import idemd_client.aio
from helpers import NAMESPACE, CardDeclined, Calls, declined_as_error, fp, new_key, ok
from idemd.v1 import idempotency_pb2 as pb
from idemd_client import (
    Client, FingerprintMismatch, IdemdError, InProgress, InvalidArgument, OutcomeUnknown, OutcomeUnknownFailure,
    Response, reason,
)

DEFAULTS = dict(lease_ttl=2.0, wait=2.0, in_progress_budget=15.0)


class Threaded:
    def client(self, address, namespace=NAMESPACE, **options):
        return Client(address, namespace, **options)

    def run_once(self, server, key, fp, operation, client=None, **options):
        calls = Calls()
        settings = dict(DEFAULTS, interceptors=[calls.sync], **(client or {}))
        with Client(server.address, NAMESPACE, **settings) as c:
            try:
                return c.run_once(key, fp, operation, **options)
            finally:
                self.calls = calls


class Asyncio:
    def client(self, address, namespace=NAMESPACE, **options):
        return idemd_client.aio.Client(address, namespace, **options)

    def run_once(self, server, key, fp, operation, client=None, **options):
        calls = Calls()
        settings = dict(DEFAULTS, interceptors=[calls.aio], **(client or {}))

        @functools.wraps(operation)
        async def asynchronous(attempt):
            return operation(attempt)

        async def main():
            async with idemd_client.aio.Client(server.address, NAMESPACE, **settings) as c:
                try:
                    return await c.run_once(key, fp, asynchronous, **options)
                finally:
                    self.calls = calls

        return asyncio.run(main())


@pytest.fixture(params=[Threaded, Asyncio], ids=["threaded", "aio"])
def flavour(request):
    return request.param()


def test_an_unexpected_exception_aborts_as_unknown_and_is_raised_as_it_is(server, flavour):
    key, seen = new_key(), []
    bug = KeyError("amount")

    def charge(attempt):
        raise bug

    with pytest.raises(KeyError) as raised:
        flavour.run_once(server, key, fp(), charge)
    assert raised.value is bug
    if sys.version_info >= (3, 11):
        assert any("aborted as outcome-unknown" in note for note in raised.value.__notes__)
    # The lease ended at once: not left for the reaper while the customer's retry waits.
    record = server.lookup(key)
    assert (record.state, record.outcome_unknown, record.abort_reason) == (
        pb.STATE_ABORTED, True, "the operation raised KeyError")
    done = flavour.run_once(server, key, fp(), lambda attempt: seen.append(attempt) or ok("{}"),
                            client=dict(wait=0, in_progress_budget=0))
    assert done.attempt == 2 and seen[0].previous.outcome_unknown


def test_a_result_that_is_not_a_response_is_a_type_error_before_complete(server, flavour):
    key = new_key()
    with pytest.raises(TypeError, match="returned dict, not an idemd_client.Response"):
        flavour.run_once(server, key, fp(), lambda attempt: {"error": "card_declined"})
    record = server.lookup(key)
    assert (record.state, record.outcome_unknown) == (pb.STATE_ABORTED, True)
    assert flavour.calls["Complete"] == 0


def test_a_body_that_is_not_bytes_or_text_fails_where_it_is_written(server, flavour):
    key = new_key()
    with pytest.raises(TypeError, match="body must be bytes or str, not dict"):
        flavour.run_once(server, key, fp(), lambda attempt: Response({"error": "card_declined"}, 402))
    record = server.lookup(key)
    assert (record.state, record.outcome_unknown, record.abort_reason) == (
        pb.STATE_ABORTED, True, "the operation raised TypeError")


def test_a_text_body_is_stored_as_utf8(server, flavour):
    key, text = new_key(), '{"amount":"1000 €"}'
    done = flavour.run_once(server, key, fp(), lambda attempt: Response(text, 201, "application/json"))
    assert done.response.body == '{"amount":"1000 €"}'.encode() and done.response.text == '{"amount":"1000 €"}'
    replay = flavour.run_once(server, key, fp(), lambda attempt: ok("{}"))
    assert replay.replayed and replay.response == done.response
    assert server.lookup(key).response == '{"amount":"1000 €"}'.encode()


def test_final_error_raises_the_callers_own_error_on_the_first_run_too(server, flavour):
    from idemd_client import Final

    key, runs = new_key(), []
    declined = Response(b'{"error":"card_declined"}', 402, "application/json")

    def decline(attempt):
        runs.append(attempt)
        raise Final(declined)

    for _ in range(2):
        with pytest.raises(CardDeclined) as raised:
            flavour.run_once(server, key, fp(), decline, client=dict(final_error=declined_as_error))
        assert raised.value.body == declined.body
    assert len(runs) == 1 and server.lookup(key).response_code == 402
    # A success is returned as usual.
    done = flavour.run_once(server, new_key(), fp(), lambda attempt: ok("{}"), final_error=declined_as_error)
    assert done.response.code == 201


@pytest.mark.parametrize("namespace", ["", "Payments", "pay ments", "x" * 65, None])
def test_a_bad_namespace_fails_when_the_client_is_built(flavour, namespace):
    with pytest.raises(InvalidArgument, match="namespace"):
        flavour.client("127.0.0.1:1", namespace)


@pytest.mark.parametrize("address", ["idemd", "grpc://idemd:50051", "http://idemd", "idemd:0", "idemd:99999",
                                     "http://idemd:50051/path", "user@idemd:50051", "::1:50051", ""])
def test_a_bad_address_fails_when_the_client_is_built(flavour, address):
    with pytest.raises(InvalidArgument, match="address"):
        flavour.client(address)


@pytest.mark.parametrize("options", [dict(lease_ttl=0.5), dict(lease_ttl=3601), dict(wait=61), dict(wait=-1),
                                     dict(in_progress_budget=-1), dict(retention=0), dict(rpc_retries=-1),
                                     dict(rpc_timeout=0), dict(lease_ttl="30"), dict(token=""),
                                     dict(final_error="nope")])
def test_a_bad_setting_fails_when_the_client_is_built(flavour, options):
    with pytest.raises(InvalidArgument):
        flavour.client("127.0.0.1:1", **options)


def test_every_address_form_reaches_idemd(server, flavour):
    host, port = server.address.rsplit(":", 1)
    for address in (f"{host}:{port}", f"http://{host}:{port}", f"http://{host}:{port}/", f"localhost:{port}"):
        if isinstance(flavour, Threaded):
            with Client(address, NAMESPACE) as c:
                assert c.run_once(new_key(), fp(), lambda attempt: ok("{}")).attempt == 1
        else:
            async def main():
                async with idemd_client.aio.Client(address, NAMESPACE) as c:
                    return await c.run_once(new_key(), fp(), lambda attempt: ok("{}"))
            assert asyncio.run(main()).attempt == 1


@pytest.mark.parametrize("key", ["", "a\nb", "tab\tkey", "é" * 128, 42, b"bytes-key"])
def test_a_bad_key_fails_before_any_call(server, flavour, key):
    with pytest.raises(InvalidArgument, match="key"):
        flavour.run_once(server, key, fp(), lambda attempt: pytest.fail("ran"))
    assert flavour.calls.counts == {}


@pytest.mark.parametrize("value", [b"x" * 65, "text", None])
def test_a_bad_fingerprint_fails_before_any_call(server, flavour, value):
    with pytest.raises(InvalidArgument, match="fingerprint"):
        flavour.run_once(server, new_key(), value, lambda attempt: pytest.fail("ran"))
    assert flavour.calls.counts == {}


def test_a_bad_setting_for_one_call_fails_before_any_call(server, flavour):
    with pytest.raises(InvalidArgument, match="lease_ttl"):
        flavour.run_once(server, new_key(), fp(), lambda attempt: pytest.fail("ran"), lease_ttl=0)
    assert flavour.calls.counts == {}
    assert issubclass(InvalidArgument, ValueError) and issubclass(InvalidArgument, IdemdError)


def test_retention_for_one_call(server, flavour):
    key = new_key()
    flavour.run_once(server, key, fp(), lambda attempt: ok("{}"), retention=timedelta(hours=48))
    record = server.lookup(key)
    kept = record.expires_at.ToSeconds() - record.completed_at.ToSeconds()
    assert kept == 48 * 3600


def test_a_retention_idemd_refuses_is_invalid_argument(server, flavour):
    with pytest.raises(InvalidArgument) as raised:
        flavour.run_once(server, new_key(), fp(), lambda attempt: pytest.fail("ran"), retention=1)
    assert (raised.value.code, raised.value.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELD")
    assert "retention" in str(raised.value)


def test_lease_ttl_for_one_call(server, flavour):
    key, seen = new_key(), {}

    def charge(attempt):
        record = server.lookup(key)
        seen["left"] = record.lease_expires_at.ToSeconds() - record.updated_at.ToSeconds()
        return ok("{}")

    flavour.run_once(server, key, fp(), charge, lease_ttl=120)
    assert 119 <= seen["left"] <= 121


def test_in_progress_budget_and_wait_for_one_call(server):
    key, started, release = new_key(), threading.Event(), threading.Event()

    def hold(attempt):
        started.set()
        release.wait(10)
        return ok("{}")

    holder = threading.Thread(target=lambda: Client(server.address, NAMESPACE).run_once(key, fp(), hold))
    holder.start()
    try:
        assert started.wait(10)
        calls = Calls()
        c = Client(server.address, NAMESPACE, interceptors=[calls.sync])
        with pytest.raises(InProgress) as raised:
            c.run_once(key, fp(), lambda attempt: pytest.fail("ran"), wait=0.2, in_progress_budget=0.5)
        assert raised.value.key == key and "still holds" in str(raised.value)
        assert calls["Begin"] >= 2, "waited, then began again within the budget"

        async def main():
            async with idemd_client.aio.Client(server.address, NAMESPACE) as ac:
                await ac.run_once(key, fp(), lambda attempt: pytest.fail("ran"), wait=0, in_progress_budget=0)

        with pytest.raises(InProgress):
            asyncio.run(main())
    finally:
        release.set()
        holder.join(10)


def test_an_outcome_idemd_cannot_store_is_aborted_as_unknown(server, flavour):
    key = new_key()
    # Larger than idemd's max_response_bytes (1 MiB by default): Complete answers INVALID_ARGUMENT.
    with pytest.raises(OutcomeUnknownFailure) as raised:
        flavour.run_once(server, key, fp(), lambda attempt: Response(b"x" * (1024 * 1024 + 1), 201))
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT and raised.value.attempt == 1
    assert isinstance(raised.value.__cause__, grpc.RpcError)
    record = server.lookup(key)
    assert (record.state, record.outcome_unknown, record.abort_reason) == (
        pb.STATE_ABORTED, True, "the outcome could not be stored")


def test_reason_reads_idemds_error_info(server):
    key = new_key()
    with Client(server.address, NAMESPACE) as c:
        c.run_once(key, fp("1"), lambda attempt: ok("{}"))
        with pytest.raises(grpc.RpcError) as raised:
            c.stub.Begin(pb.BeginRequest(namespace=NAMESPACE, key=key, fingerprint=fp("2")))
        assert reason(raised.value) == "FINGERPRINT_MISMATCH"
        with pytest.raises(FingerprintMismatch):
            c.run_once(key, fp("2"), lambda attempt: ok("{}"))
    assert reason(ValueError("not a gRPC error")) is None


def test_close_leaves_a_channel_the_caller_owns_open(server):
    channel = grpc.insecure_channel(server.address)
    Client(None, NAMESPACE, channel=channel).close()
    assert Client(None, NAMESPACE, channel=channel).run_once(new_key(), fp(), lambda attempt: ok("{}")).attempt == 1
    channel.close()


def test_an_async_operation_given_to_the_threaded_client_is_a_type_error(server):
    async def charge(attempt):
        return ok("{}")

    def timeout(attempt):
        raise OutcomeUnknown("timeout")

    key = new_key()
    with Client(server.address, NAMESPACE) as c:
        with pytest.raises(TypeError, match="need idemd_client.aio.Client"):
            c.run_once(new_key(), fp(), charge)
        with pytest.raises(OutcomeUnknownFailure):
            c.run_once(key, fp(), timeout)
        with pytest.raises(TypeError, match="need idemd_client.aio.Client"):
            c.run_once(key, fp(), lambda attempt: ok("{}"), reconcile=charge)
    record = server.lookup(key)
    assert (record.attempt, record.outcome_unknown) == (2, True), "still outcome-unknown"


def test_the_decorators_check_their_options_at_once(server):
    c = Client(server.address, NAMESPACE)
    with pytest.raises(TypeError, match="unknown run_once options"):
        c.once(key=lambda order: order, fingerprint_of=lambda order: b"", rpc_retries=3)
    with pytest.raises(InvalidArgument):
        idemd_client.aio.Client(server.address, NAMESPACE).once(
            key=lambda order: order, fingerprint_of=lambda order: b"", lease_ttl=0)
    assert inspect.isfunction(c.once(key=lambda order: order, fingerprint_of=lambda order: b"")(lambda a, o: ok("")))
