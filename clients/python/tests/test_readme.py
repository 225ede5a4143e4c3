"""Every Python example of the repository's README.md and of clients/python/README.md runs here, against the
shared idemd, with fake providers (fakes.py) standing for Stripe and the others. The blocks of one README run
in order in one namespace, as a reader pastes them, with the address "idemd:50051" replaced by the test
server's; then the test drives what they defined through declines, refusals and lost answers."""
import json
import re
import sys

import pytest

from fakes import FakeLedger, FakeProvider, Order, fake_stripe
from helpers import HERE, new_key
from idemd_client import OutcomeUnknownFailure, RetryableFailure, fingerprint

ROOT_README = HERE.parents[2] / "README.md"
CLIENT_README = HERE.parents[0] / "README.md"


def run_blocks(path, server, **names):
    """Runs the README's ```python blocks in order; returns their namespace and how many ran."""
    blocks = re.findall(r"^```python\n(.*?)^```", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    assert blocks, f"no Python example in {path}"
    namespace = dict(names, __name__="readme_example")
    for number, block in enumerate(blocks, 1):
        assert "Client(" not in block or '"idemd:50051"' in block, "examples connect to idemd:50051"
        code = block.replace('"idemd:50051"', repr(server.address))
        exec(compile(code, f"{path.name}, Python example {number}", "exec"), namespace)
    return namespace, len(blocks)


def test_the_readmes_python_example_runs(server, monkeypatch):
    stripe = fake_stripe()
    monkeypatch.setitem(sys.modules, "stripe", stripe)
    order = Order(new_key(), "1000")
    example, count = run_blocks(ROOT_README, server, stripe=stripe, order=order)
    assert count == 1
    charge, done = example["charge"], example["done"]
    assert (done.replayed, done.response.code) == (False, 201)
    assert json.loads(done.response.body)["id"] == stripe.charges[0]["id"]
    again = charge(order)
    assert again.replayed and again.response == done.response and len(stripe.charges) == 1
    # A decline: Stripe's json_body (a dict) is stored as JSON, and every retry gets it without calling Stripe.
    declined = Order(new_key(), "1000")
    stripe.faults.append("decline")
    first = charge(declined)
    assert (first.response.code, json.loads(first.response.body)["error"]["code"]) == (402, "card_declined")
    calls = stripe.calls
    assert charge(declined).replayed and stripe.calls == calls
    # Refused: nothing happened, so the retry charges.
    refused = Order(new_key(), "1000")
    stripe.faults.append("rate_limit")
    with pytest.raises(RetryableFailure):
        charge(refused)
    assert charge(refused).attempt == 2 and len(stripe.charges) == 2
    # Charged, answer lost: the retry gets the same charge through the downstream key.
    lost = Order(new_key(), "1000")
    stripe.faults.append("timeout_after_charge")
    with pytest.raises(OutcomeUnknownFailure):
        charge(lost)
    retried = charge(lost)
    assert retried.attempt == 2 and len(stripe.charges) == 3
    assert json.loads(retried.response.body)["id"] == stripe.charges[2]["id"]


def test_the_python_client_readme_examples_run(server, monkeypatch, capsys):
    stripe, provider, ledger = fake_stripe(), FakeProvider(), FakeLedger()
    monkeypatch.setitem(sys.modules, "stripe", stripe)
    order = Order(new_key(), "1000")
    example, count = run_blocks(CLIENT_README, server, stripe=stripe, provider=provider, ledger=ledger, order=order)
    assert count == 4
    # asyncio: the same order twice, charged once.
    assert capsys.readouterr().out == "True True\n" and len(provider.charges) == 1
    # The web handler over the threaded example. The order the asyncio example charged is the same record
    # (same key, same namespace): replayed, Stripe is not called.
    endpoint = example["charge_endpoint"]
    assert endpoint(order) == (201, provider.charges[0].json()) and stripe.calls == 0
    order = Order(new_key(), "1000")
    status, body = endpoint(order)
    assert (status, json.loads(body)["id"]) == (201, stripe.charges[0]["id"])
    assert endpoint(order) == (status, body) and len(stripe.charges) == 1
    declined = Order(new_key(), "1000", card="tok_chargeDeclined")
    assert endpoint(declined) == (402, "Your card was declined.")
    calls = stripe.calls
    assert endpoint(declined) == (402, "Your card was declined.") and stripe.calls == calls, "replayed"
    assert endpoint(Order(order.id, "2000")) == (422, "the order changed")
    refused = Order(new_key(), "1000")
    stripe.faults.append("rate_limit")
    assert endpoint(refused)[0] == 503 and endpoint(refused)[0] == 201 and len(stripe.charges) == 2
    lost = Order(new_key(), "1000")
    stripe.faults.append("timeout_after_charge")
    assert endpoint(lost)[0] == 503 and endpoint(lost)[0] == 201 and len(stripe.charges) == 3
    # Reconcile: the example's run, then a lost answer found by the hook instead of a second charge.
    assert (example["done"].attempt, example["done"].reconciled) == (1, False)
    client, charge_ledger, find_charge = example["client"], example["charge_ledger"], example["find_charge"]
    key, charges = new_key(), len(ledger.charges)
    ledger.faults.append("timeout_after_charge")
    with pytest.raises(OutcomeUnknownFailure):
        client.run_once(key, fingerprint({"amount": "1000"}), charge_ledger, reconcile=find_charge)
    done = client.run_once(key, fingerprint({"amount": "1000"}), charge_ledger, reconcile=find_charge)
    assert (done.reconciled, done.attempt, len(ledger.charges)) == (True, 2, charges + 1)
