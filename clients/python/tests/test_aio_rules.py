"""What only the asyncio client has: cancellation (the lease still ends, and a Complete under way is finished),
the decorator on ``async def``, and a client built before the event loop runs."""
import asyncio
import inspect
import warnings

import grpc.aio
import pytest

from helpers import NAMESPACE, fp, new_key, ok
from idemd.v1 import idempotency_pb2 as pb
from idemd_client.aio import Client, OutcomeUnknown, OutcomeUnknownFailure, Response


def client(server, **options):
    return Client(server.address, NAMESPACE, **dict(dict(lease_ttl=2.0, wait=2.0), **options))


def test_aio_a_cancelled_operation_is_aborted_as_unknown(server):
    async def main():
        key, started, seen = new_key(), asyncio.Event(), []

        async def charge(attempt):
            started.set()
            await asyncio.sleep(10)  # the provider call, in flight when the caller gives up
            return ok("{}")

        async with client(server) as c:
            task = asyncio.ensure_future(c.run_once(key, fp(), charge))
            await asyncio.wait_for(started.wait(), 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            record = server.lookup(key)
            assert (record.state, record.outcome_unknown, record.abort_reason) == (
                pb.STATE_ABORTED, True, "the operation raised CancelledError")
            # The key is free at once for the customer's retry, which knows the first attempt may have charged.
            done = await c.run_once(key, fp(), lambda attempt: seen.append(attempt) or ok("{}"),
                                    wait=0, in_progress_budget=0)
        assert done.attempt == 2 and seen[0].previous.outcome_unknown

    asyncio.run(main())


def test_aio_a_timeout_around_run_once_ends_the_lease(server):
    async def main():
        key = new_key()

        async def slow(attempt):
            await asyncio.sleep(10)
            return ok("{}")

        async with client(server) as c:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(c.run_once(key, fp(), slow), 0.5)
        record = server.lookup(key)
        assert (record.state, record.outcome_unknown) == (pb.STATE_ABORTED, True)

    asyncio.run(main())


def test_aio_a_cancelled_wait_takes_no_lease(server):
    async def main():
        key, started, release = new_key(), asyncio.Event(), asyncio.Event()

        async def hold(attempt):
            started.set()
            await release.wait()
            return ok('{"charge":"ch_holder"}')

        async with client(server) as holder, client(server, wait=10.0) as waiter:
            held = asyncio.ensure_future(holder.run_once(key, fp(), hold))
            await asyncio.wait_for(started.wait(), 10)
            waiting = asyncio.ensure_future(waiter.run_once(key, fp(), lambda attempt: pytest.fail("ran")))
            await asyncio.sleep(0.3)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            release.set()
            done = await asyncio.wait_for(held, 10)
        assert (done.attempt, done.replayed) == (1, False)
        record = server.lookup(key)
        assert (record.state, record.attempt, record.response) == (pb.STATE_COMPLETED, 1, b'{"charge":"ch_holder"}')

    asyncio.run(main())


def test_aio_a_complete_under_way_is_finished_when_the_caller_is_cancelled(server):
    async def main():
        key, completing = new_key(), asyncio.Event()

        class SlowComplete(grpc.aio.UnaryUnaryClientInterceptor):
            async def intercept_unary_unary(self, continuation, details, request):
                if details.method.endswith(b"/Complete"):
                    completing.set()
                    await asyncio.sleep(0.5)
                return await continuation(details, request)

        async with client(server, interceptors=[SlowComplete()]) as c:
            task = asyncio.ensure_future(c.run_once(key, fp(), lambda attempt: ok('{"charge":"ch_1"}')))
            await asyncio.wait_for(completing.wait(), 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        # The charge happened: its outcome is stored, not left for the reaper to call unknown.
        record = server.lookup(key)
        assert (record.state, record.response) == (pb.STATE_COMPLETED, b'{"charge":"ch_1"}')

    asyncio.run(main())


def test_aio_the_decorator_makes_a_coroutine_function(server):
    async def main():
        runs, asked = [], []
        async with client(server) as c:
            async def found(attempt, order):
                asked.append(order)
                return Response(f"found {order}", 201)

            @c.once(key=lambda order: order, fingerprint_of=lambda order: fp(), reconcile=found)
            async def charge(attempt, order):
                runs.append(order)
                if len(runs) == 1:
                    raise OutcomeUnknown("provider timeout")
                return ok("{}")

            assert inspect.iscoroutinefunction(charge) and charge.__name__ == "charge"
            order = new_key()
            with pytest.raises(OutcomeUnknownFailure):
                await charge(order)
            done = await charge(order)
            again = await charge(order)
        assert (done.reconciled, done.response.body, asked, runs) == (True, f"found {order}".encode(), [order], [order])
        assert again.replayed and again.response == done.response

    asyncio.run(main())


def test_aio_a_client_built_before_the_loop_runs(server):
    # A module-level client, as a FastAPI app makes it: the channel opens on the loop of its first call.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = client(server)

        async def main():
            try:
                return await c.run_once(new_key(), fp(), lambda attempt: ok("{}"))
            finally:
                await c.close()

        assert asyncio.run(main()).attempt == 1
