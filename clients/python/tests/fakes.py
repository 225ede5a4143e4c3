"""Stand-ins for the payment providers the README examples call: a Stripe-like SDK module (``stripe``), an
asyncio provider client (``provider``) and a provider that does not deduplicate (``ledger``). Each counts the
charges it really made, so a test can prove "charged once"."""
from __future__ import annotations

import asyncio
import itertools
import json
import types
from dataclasses import dataclass
from typing import Dict, List, Optional


@dataclass(frozen=True)
class Order:
    id: str
    amount: str
    currency: str = "eur"
    card: str = "tok_visa"


_ids = itertools.count(1)


class StripeObject(dict):
    """Like stripe-python's: a dict with attribute access."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as error:
            raise AttributeError(name) from error


class StripeError(Exception):
    def __init__(self, message=None, http_body=None, http_status=None, json_body=None, headers=None, code=None):
        super().__init__(message)
        self.http_body, self.http_status, self.json_body, self.code = http_body, http_status, json_body, code


class CardError(StripeError):
    def __init__(self, message, param, code, http_body=None, http_status=None, json_body=None, headers=None):
        super().__init__(message, http_body, http_status, json_body, headers, code)
        self.param = param


class RateLimitError(StripeError):
    pass


class APIConnectionError(StripeError):
    pass


def fake_stripe() -> types.ModuleType:
    """A ``stripe`` module whose ``Charge.create`` deduplicates on ``idempotency_key`` as Stripe does (the same
    key replays the first result, a decline included). ``tok_chargeDeclined`` is declined; ``stripe.faults``
    queues what the next calls do instead: "decline", "rate_limit" (refused, nothing charged) or
    "timeout_after_charge" (charged, but the answer is lost)."""
    stripe = types.ModuleType("stripe")
    stripe.error = types.ModuleType("stripe.error")
    for error in (StripeError, CardError, RateLimitError, APIConnectionError):
        setattr(stripe.error, error.__name__, error)
    stripe.faults: List[str] = []
    stripe.charges: List[StripeObject] = []
    stripe.calls = 0
    results: Dict[str, object] = {}

    class Charge:
        @staticmethod
        def create(amount, currency, source="tok_visa", idempotency_key=None, **params):
            stripe.calls += 1
            fault = stripe.faults.pop(0) if stripe.faults else None
            if fault == "rate_limit":
                raise RateLimitError("Too many requests", http_status=429)
            if idempotency_key in results:
                result = results[idempotency_key]
            elif source == "tok_chargeDeclined" or fault == "decline":
                body = {"error": {"type": "card_error", "code": "card_declined", "message": "Your card was declined."}}
                result = CardError("Your card was declined.", None, "card_declined", json.dumps(body), 402, body)
            else:
                result = StripeObject(id=f"ch_{next(_ids)}", object="charge", amount=amount, currency=currency,
                                      status="succeeded")
                stripe.charges.append(result)
            if idempotency_key is not None:
                results[idempotency_key] = result
            if fault == "timeout_after_charge":
                raise APIConnectionError("Request timed out")
            if isinstance(result, Exception):
                raise result
            return result

    stripe.Charge = Charge
    return stripe


class FakeProvider:
    """An asyncio payment API client that deduplicates on ``idempotency_key``; amount "666" is declined."""

    class Declined(Exception):
        def __init__(self, body: str):
            super().__init__("declined")
            self.body = body

    class Timeout(Exception):
        pass

    class Unavailable(Exception):
        pass

    @dataclass(frozen=True)
    class Charged:
        id: str
        amount: str

        def json(self) -> str:
            return json.dumps({"id": self.id, "amount": self.amount})

    def __init__(self):
        self.charges: List["FakeProvider.Charged"] = []
        self.faults: List[str] = []
        self._by_key: Dict[str, "FakeProvider.Charged"] = {}

    async def charge(self, amount, currency, idempotency_key):
        await asyncio.sleep(0.01)
        fault = self.faults.pop(0) if self.faults else None
        if fault == "unavailable":
            raise FakeProvider.Unavailable("503")
        if amount == "666":
            raise FakeProvider.Declined('{"error":"card_declined"}')
        if idempotency_key not in self._by_key:
            self._by_key[idempotency_key] = FakeProvider.Charged(f"ch_{next(_ids)}", amount)
            self.charges.append(self._by_key[idempotency_key])
        if fault == "timeout_after_charge":
            raise FakeProvider.Timeout("no answer within 10 s")
        return self._by_key[idempotency_key]


class FakeLedger:
    """A provider that does NOT deduplicate: every call charges; it can be searched by metadata."""

    def __init__(self):
        self.charges: List[dict] = []
        self.faults: List[str] = []

    def charge(self, amount, currency, idempotency_key):
        charge = {"id": f"ch_{next(_ids)}", "amount": amount, "metadata": {"idempotency_key": idempotency_key}}
        self.charges.append(charge)
        if self.faults and self.faults.pop(0) == "timeout_after_charge":
            raise TimeoutError("no answer within 10 s")
        return charge

    def search(self, idempotency_key) -> Optional[dict]:
        found = [c for c in self.charges if c["metadata"]["idempotency_key"] == idempotency_key]
        return found[0] if found else None
