"""The Python worker of the payment demo (its protocol: examples/payments/polyglot.rs).

Charges its share of the payments through the HTTP provider with the threaded
client's run_once, and exits between charging and completing when the
provider says so.
"""
import http.client
import os
import random
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

from idemd_client import Client, Final, OutcomeUnknown, Response, Retryable, entity_key, fingerprint

PROVIDER = urllib.parse.urlsplit(os.environ["PROVIDER_URL"])
WORKER = os.environ["WORKER"]
RECONCILE = os.environ["RECONCILE"] == "on"
PRINT = threading.Lock()


def say(line: str) -> None:
    with PRINT:
        print(line, flush=True)


def provider(method: str, path: str, headers=None, body: bytes = b""):
    connection = http.client.HTTPConnection(PROVIDER.hostname, PROVIDER.port, timeout=10)
    try:
        connection.request(method, path, body=body, headers={"content-type": "application/json", **(headers or {})})
        answer = connection.getresponse()
        return answer.status, answer.getheader("demo-crash"), answer.read()
    finally:
        connection.close()


def charge(payment: int, attempt) -> Response:
    body = f'{{"payment":"pay-{payment}","amount":"{1000 + 7 * payment}","currency":"EUR"}}'.encode()
    try:
        status, crash, answer = provider(
            "POST", "/v1/charges", {"idempotency-key": attempt.downstream_key, "demo-worker": WORKER}, body
        )
    except OSError as error:
        # The request may have left: whether it charged is unknown.
        raise OutcomeUnknown(str(error)) from error
    if status == 201:
        if crash == "now":
            os._exit(3)  # charged, and the process dies before telling idemd
        return Response(answer, 201, "application/json")
    if status == 402:
        raise Final(Response(answer, 402, "application/json"))
    if status == 504:
        raise OutcomeUnknown("the provider's answer was lost")
    raise Retryable(f"the provider answered {status}")


def find(attempt):
    status, _, answer = provider("GET", "/v1/charges?idempotency_key=" + urllib.parse.quote(attempt.downstream_key))
    if status == 200:
        return Response(answer, 201, "application/json")
    if status == 402:
        return Response(answer, 402, "application/json")
    if status == 404:
        return None
    raise RuntimeError(f"the lookup answered {status}")


def main() -> None:
    payments = [int(p) for p in os.environ["PAYMENTS"].split(",") if p]
    client = Client(os.environ["IDEMD_ADDR"], os.environ["NAMESPACE"], lease_ttl=1.0, wait=0.5, in_progress_budget=2.0)
    # The first call opens the connection: done before the race; its failure is no matter.
    try:
        client.run_once(f"warm-up-{random.getrandbits(64)}", b"", lambda attempt: Response(b"", 200, "application/json"))
    except Exception:
        pass
    say("ready")
    sys.stdin.readline()
    counts = {"completed": 0, "replayed": 0, "reconciled": 0, "unfinished": 0}

    def pay(payment: int) -> None:
        key = entity_key(f"pay-{payment}", "charge")
        fp = fingerprint({"payment": f"pay-{payment}".encode(), "amount": str(1000 + 7 * payment).encode(),
                          "currency": b"EUR"})
        hook = {"reconcile": find} if RECONCILE else {}
        for _ in range(60):
            try:
                done = client.run_once(key, fp, lambda attempt: charge(payment, attempt), **hook)
            except Exception:  # every failure of a call is retried here; idemd says when it ran
                time.sleep(random.uniform(0.02, 0.2))
                continue
            how = "replayed" if done.replayed else "reconciled" if done.reconciled else "completed"
            with PRINT:
                counts[how] += 1
                print(f"result pay-{payment} {how} {done.response.code} {done.response.body.decode()}", flush=True)
            return
        with PRINT:
            counts["unfinished"] += 1

    with ThreadPoolExecutor(max_workers=int(os.environ["CONCURRENCY"])) as pool:
        list(pool.map(pay, payments))
    say("summary " + " ".join(f"{name}={count}" for name, count in counts.items()))


if __name__ == "__main__":
    main()
