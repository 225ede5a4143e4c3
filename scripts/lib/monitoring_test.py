#!/usr/bin/env python3
"""The body of scripts/monitoring-test (which starts Postgres and sets the
environment below): two idemd replicas on that database (one plaintext with a
tokens file, one with TLS), a real Prometheus scraping both every second and
evaluating a copy of deploy/prometheus/idemd-rules.yml with shortened `for:`
and thresholds, a known mix of calls and faults, and then:

- every alert an injected fault should raise reaches `firing`;
- every recording rule and every query of deploy/grafana/idemd.json returns
  data (a series with a number in it) over the run;
- every idemd_* name the rules and the dashboard use is exported by idemd.

Every wait has a deadline; the whole run has one too. The processes started
here are stopped by their pid, however the run ends.

Environment: MONITORING_ROOT (scratch folder), PG_PORT, PG_CTL (a command
line running pg_ctl as the cluster's user), PG_DATA, PG_OPTIONS, PG_LOG,
IDEMD_BIN, GRPCURL, PROMETHEUS, MONITORING_BUDGET (seconds, default 240).
"""
import base64
import concurrent.futures
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
ROOT = Path(os.environ["MONITORING_ROOT"])
DEADLINE = time.monotonic() + float(os.environ.get("MONITORING_BUDGET", "240"))
STARTED = time.time()

# What each injected fault must raise (the test copy's `for:` is 1s); any
# other alert that fires fails the run.
FAULTS = {
    "a crashed holder: its 1 s lease reaped": {"IdemdLeasesReaped"},
    "its Complete after the reap": {"IdemdLeaseLostOnComplete"},
    "its key reused for another request": {"IdemdFingerprintMismatches"},
    "8 parked Begins over a cap of 4": {"IdemdRequestsRejected"},
    "a bad line in A's tokens file": {"IdemdTokensFileReloadFailed"},
    "garbage over B's certificate": {"IdemdTlsCertificateReloadFailed"},
    "every call over the test copy's 0.5 ms latency threshold": {"IdemdLatencyBudgetBurn"},
    "Postgres stopped under load": {
        "IdemdUnavailable", "IdemdReplicaNotReady", "IdemdStoreErrors", "IdemdBeginErrorBudgetBurn",
        "IdemdReaperNotRunning", "IdemdPurgerNotRunning",
    },
    "leases and records due in the outage, handled after it": {"IdemdReaperFallingBehind", "IdemdPurgerFallingBehind"},
}
OUTAGE_ALERTS = FAULTS["Postgres stopped under load"]
EXPECTED = set().union(*FAULTS.values())


class Failure(Exception):
    pass


def log(message):
    print(f"==> [{time.time() - STARTED:5.1f}s] {message}", file=sys.stderr, flush=True)


def left(cap):
    remaining = DEADLINE - time.monotonic()
    if remaining <= 0:
        raise Failure("the monitoring test ran out of its time budget (MONITORING_BUDGET)")
    return min(cap, remaining)


def wait_until(what, check, timeout):
    until = time.monotonic() + left(timeout)
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= until:
            raise Failure(f"{what}: not within {timeout} s")
        time.sleep(0.25)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=left(timeout)) as response:
        return response.read().decode()


def run(argv, timeout=30, check=True, env=None):
    result = subprocess.run(argv, capture_output=True, text=True, timeout=left(timeout), stdin=subprocess.DEVNULL,
                            env=env)
    if check and result.returncode != 0:
        raise Failure(f"{shlex.join(argv)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


class Processes:
    """Children started here, each stopped by its pid."""

    def __init__(self):
        self.children = []

    def start(self, name, argv):
        log_file = open(ROOT / f"{name}.log", "w")
        child = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.children.append((name, child))
        return child

    def stop_all(self):
        for _, child in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for name, child in self.children:
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                log(f"{name} (pid {child.pid}) did not stop on SIGTERM: killed")
                child.kill()
                child.wait(timeout=5)


class Prometheus:
    def __init__(self, base):
        self.base = base

    def api(self, path, **params):
        url = f"{self.base}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            body = json.loads(http_get(url, timeout=15))
        except urllib.error.HTTPError as error:
            body = json.loads(error.read().decode() or "{}")
        if body.get("status") != "success":
            raise Failure(f"Prometheus refused {params.get('query', path)!r}: {body.get('error')}")
        return body["data"]

    def has_data(self, query, start, end):
        """Whether the query, over [start, end], gives a series with a number in it."""
        data = self.api("query_range", query=query, start=f"{start:.3f}", end=f"{end:.3f}", step="1")
        return any(value not in ("NaN", "+Inf", "-Inf") for series in data["result"] for _, value in series["values"])


class AlertWatch(threading.Thread):
    """Polls the alerts every half second and keeps when each first went pending and firing."""

    def __init__(self, prometheus):
        super().__init__(daemon=True)
        self.prometheus, self.seen, self.lock, self.stopped = prometheus, {}, threading.Lock(), False

    def run(self):
        while not self.stopped:
            try:
                alerts = self.prometheus.api("alerts")["alerts"]
            except Exception:  # noqa: BLE001: a failed poll is retried; the waits have deadlines
                alerts = []
            with self.lock:
                for alert in alerts:
                    states = self.seen.setdefault(alert["labels"]["alertname"], {})
                    states.setdefault(alert["state"], time.time() - STARTED)
            time.sleep(0.5)

    def firing(self):
        with self.lock:
            return {name for name, states in self.seen.items() if "firing" in states}

    def wait_firing(self, names, timeout, rules):
        try:
            wait_until(f"alerts firing {sorted(names)}", lambda: names <= self.firing(), timeout)
        except Failure as failure:
            missing = sorted(names - self.firing())
            details = []
            for rule in (r for g in yaml.safe_load(rules.read_text())["groups"] for r in g["rules"]):
                if rule.get("alert") in missing:
                    inner = re.sub(r"\s*(>|==)\s*[\d.()* ]+$", "", rule["expr"].strip())
                    result = self.prometheus.api("query", query=inner)["result"]
                    details.append(f"{rule['alert']}: {inner} = {[r['value'][1] for r in result]}")
            raise Failure(f"{failure}; still not firing: {missing}\n  " + "\n  ".join(details)) from None


class Idemd:
    """One replica: its gRPC and metrics addresses, and how to call it."""

    def __init__(self, name, grpc, metrics, token=None, ca=None):
        self.name, self.grpc, self.metrics, self.token, self.ca = name, grpc, metrics, token, ca

    def ready(self):
        try:
            return re.search(r"^idemd_ready 1$", http_get(f"http://{self.metrics}/metrics"), re.M) is not None
        except OSError:
            return False

    def call(self, method, body, expect_error=None):
        argv = [os.environ["GRPCURL"], "-max-time", "10"]
        argv += ["-cacert", str(self.ca)] if self.ca else ["-plaintext"]
        if self.token:
            argv += ["-H", f"authorization: Bearer {self.token}"]
        argv += ["-d", json.dumps(body), self.grpc, f"idemd.v1.Idempotency/{method}"]
        result = run(argv, check=False)
        answer = result.stdout + result.stderr
        if expect_error is None and result.returncode != 0:
            raise Failure(f"{method} {body}: {answer}")
        if expect_error is not None and expect_error not in answer:
            raise Failure(f"{method} {body}: expected {expect_error}, got: {answer}")
        return json.loads(result.stdout) if expect_error is None else answer

    def begin(self, key, lease="60s", retention="120s", fingerprint=b"request", namespace="payments", **kwargs):
        body = {"namespace": namespace, "key": key, "fingerprint": base64.b64encode(fingerprint).decode(),
                "lease_ttl": lease, "retention": retention}
        return self.call("Begin", body, **kwargs)


def idemd(processes, name, database_url, extra):
    replica = Idemd(name, f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}")
    processes.start(name, [
        os.environ["IDEMD_BIN"], "serve", "--listen", replica.grpc, "--metrics-listen", replica.metrics,
        "--database-url", database_url, "--reaper-interval", "1s", "--purge-interval", "1s",
        "--min-retention", "1s", "--store-timeout", "2s", "--db-max-connections", "4", *extra,
    ])
    wait_until(f"{name} ready", replica.ready, 60)
    return replica


def bench(replica, *args, seconds):
    env = {**os.environ, "IDEMD_TOKEN": replica.token or ""}
    run([os.environ["IDEMD_BIN"], "bench", "--addr", f"http://{replica.grpc}", "--json", "--duration",
         f"{seconds}s", *args], timeout=seconds + 30, env=env)


def cli(replica, *args):
    env = {**os.environ, "IDEMD_TOKEN": replica.token, "IDEMD_ADDR": f"http://{replica.grpc}"}
    return run([os.environ["IDEMD_BIN"], *args], env=env).stdout


def pg_ctl(*args):
    run(shlex.split(os.environ["PG_CTL"]) + ["-D", os.environ["PG_DATA"], *args], timeout=90)


def metric_names(text):
    return {re.sub(r"_(bucket|count|sum|total)$", "", n) for n in re.findall(r"\bidemd_[a-z_]+", text)}


def main():
    processes = Processes()
    try:
        exercise(processes)
    finally:
        processes.stop_all()


def exercise(processes):
    database_url = f"postgres://postgres@127.0.0.1:{os.environ['PG_PORT']}/idemd"
    token_out = run([os.environ["IDEMD_BIN"], "token", "--grant", "payments", "--grant", "bench", "--grant", "parked",
                     "--grant", "admin:payments"]).stdout.split("\n")
    token, line = token_out[0].strip(), token_out[1].strip()
    tokens = ROOT / "tokens"
    tokens.write_text(line + " name=monitoring-test\n")
    cert, key = ROOT / "tls.crt", ROOT / "tls.key"
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)])

    log("starting two idemd replicas on Postgres: A plaintext with a tokens file, B with TLS")
    a = idemd(processes, "idemd-a", database_url, ["--auth-tokens-file", str(tokens), "--max-waiters-per-namespace", "4"])
    a.token = token
    b = idemd(processes, "idemd-b", database_url, ["--tls-cert", str(cert), "--tls-key", str(key), "--no-migrate"])
    b.ca = cert

    rules = ROOT / "rules.yml"
    run([sys.executable, str(REPO / "deploy/prometheus/generate"), "--rules-to", str(rules), "--for", "1s",
         "--reaper-stale", "5s", "--purger-stale", "5s", "--reaper-lag", "2", "--purger-lag", "2",
         "--latency-threshold", "0.0005"])
    prometheus_port = free_port()
    config = ROOT / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": "idemd", "static_configs": [{"targets": [a.metrics, b.metrics]}]}],
    }))
    log(f"starting Prometheus on 127.0.0.1:{prometheus_port} (scrape and evaluation every 1s)")
    processes.start("prometheus", [
        os.environ["PROMETHEUS"], f"--config.file={config}", f"--storage.tsdb.path={ROOT / 'prometheus-data'}",
        f"--web.listen-address=127.0.0.1:{prometheus_port}",
    ])
    prometheus = Prometheus(f"http://127.0.0.1:{prometheus_port}")
    wait_until("Prometheus ready", lambda: _ok(lambda: http_get(f"{prometheus.base}/-/ready")), 60)
    wait_until("both targets scraped", lambda: len([
        r for r in prometheus.api("query", query='up{job="idemd"} == 1')["result"]]) == 2, 30)
    watch = AlertWatch(prometheus)
    watch.start()
    start = time.time()

    log("load: idemd bench, Begin/Complete pairs at 200/s with 20% duplicates for 6 s")
    bench(a, "--namespace", "bench", "--concurrency", "8", "--rate", "200", "--duplicate-ratio", "0.2", seconds=6)
    log("waiters over --max-waiters-per-namespace 4: 8 parked Begins for 3 s (RESOURCE_EXHAUSTED)")
    bench(a, "--mode", "park", "--namespace", "parked", "--concurrency", "8", seconds=3)

    log("a crashed holder: a 1 s lease never completed, reaped; its late Complete gets LEASE_LOST")
    crashed = a.begin("crash-1", lease="1s")["acquired"]
    # Either replica may reap it: they share the database.
    wait_until("the lease reaped", lambda: prometheus.api(
        "query", query='sum(idemd_reaped_leases_total{job="idemd"}) >= 1')["result"], 30)
    a.call("Complete", {"namespace": "payments", "key": "crash-1", "lease_token": crashed["leaseToken"],
                        "response": base64.b64encode(b"late").decode()}, expect_error="LEASE_LOST")
    log("a fingerprint mismatch: the key crash-1 reused for another request")
    a.begin("crash-1", fingerprint=b"another request", expect_error="FINGERPRINT_MISMATCH")
    log("records that expire at once, for the purger; Begins through B over TLS")
    # A record expires at the later of its lease's end and its retention.
    for index in range(2):
        b.begin(f"short-{index}", lease="1s", retention="1s")
    log("on call: admin list of the outcome-unknown aborts, history and lookup of the reaped key")
    listed = cli(a, "admin", "list", "--namespace", "payments", "--state", "aborted", "--outcome-unknown", "--since", "1h")
    history = cli(a, "admin", "history", "--namespace", "payments", "--key", "crash-1")
    looked_up = cli(a, "lookup", "--namespace", "payments", "--key", "crash-1")
    if "crash-1" not in listed or "reaped" not in history or "aborted" not in looked_up:
        raise Failure(f"the CLI did not show the reaped lease:\n{listed}\n{history}\n{looked_up}")

    log("a bad line appended to A's tokens file; garbage written over B's certificate")
    with tokens.open("a") as file:
        file.write("sha256:not-a-hash payments\n")
    cert.write_text("not a certificate\n")

    log("records and leases that fall due during the outage (in 3 s), to be handled late once it ends")
    due = [lambda i=i: a.begin(f"due-{i}", lease="3s", retention="3s") for i in range(5)]
    due += [lambda i=i: a.begin(f"crash-{i + 2}", lease="3s") for i in range(5)]
    begun = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(len(due)) as pool:
        for future in [pool.submit(call) for call in due]:
            future.result(timeout=left(30))
    log("Postgres stopped (pg_ctl stop -m immediate); load goes on")
    pg_ctl("-m", "immediate", "-w", "stop")
    stopped = time.monotonic()
    if stopped - begun > 2.5:
        raise Failure(f"the outage began {stopped - begun:.1f} s after the 3 s leases: some fell due before it")
    bench_during = threading.Thread(target=lambda: _ok(lambda: bench(
        a, "--namespace", "bench", "--concurrency", "8", seconds=6)), daemon=True)
    bench_during.start()
    watch.wait_firing(OUTAGE_ALERTS, 90, rules)
    bench_during.join(timeout=left(40))
    # Long enough that what fell due in the outage is handled late by more than the test's 5 s.
    time.sleep(max(0.0, 10 - (time.monotonic() - stopped)))
    log("Postgres started again")
    pg_ctl("-w", "-t", "60", "-o", os.environ["PG_OPTIONS"], "-l", os.environ["PG_LOG"], "start")
    wait_until("both replicas ready again", lambda: a.ready() and b.ready(), 60)
    watch.wait_firing(EXPECTED, 90, rules)
    end = time.time()

    log("every recording rule and every dashboard query returns data over the run")
    groups = yaml.safe_load((REPO / "deploy/prometheus/idemd-rules.yml").read_text())["groups"]
    recorded = sorted({rule["record"] for group in groups for rule in group["rules"] if "record" in rule})
    dashboard = json.loads((REPO / "deploy/grafana/idemd.json").read_text())
    queries = [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel.get("targets", [])]
    empty = []
    for name in recorded:
        if not prometheus.has_data(name, start, end):
            empty.append(f"recording rule {name}")
    for title, expr in queries:
        query = (expr.replace("$__rate_interval", "15s").replace("$job", "idemd")
                 .replace("$instance", ".*"))
        if not prometheus.has_data(query, start, end):
            empty.append(f"panel {title!r}: {query}")
    used = metric_names((REPO / "deploy/prometheus/idemd-rules.yml").read_text() + json.dumps(dashboard))
    exported = metric_names(http_get(f"http://{a.metrics}/metrics") + http_get(f"http://{b.metrics}/metrics"))
    for name in sorted(used - exported - {"idemd_begin_errors", "idemd_slow_calls"}):
        empty.append(f"{name}: used by the rules or the dashboard, exported by neither replica")
    if empty:
        raise Failure("no data for:\n  " + "\n  ".join(empty))
    log(f"{len(recorded)} recording rules and {len(queries)} panel queries returned data")

    log("which fault raised which alert (seconds as in the log lines; the test copy's for: is 1s):")
    with watch.lock:
        for fault, names in FAULTS.items():
            print(f"    {fault}:", file=sys.stderr)
            for name in sorted(names):
                states = sorted(watch.seen[name].items(), key=lambda state: state[1])
                print(f"      {name}: " + ", ".join(f"{state} at {at:.0f}s" for state, at in states), file=sys.stderr)
    unexpected = sorted(watch.firing() - EXPECTED)
    if unexpected:
        raise Failure(f"alerts fired that no injected fault explains: {unexpected}")
    watch.stopped = True
    log(f"monitoring test: ok ({len(EXPECTED)} alerts fired as the faults predict, no other)")


def _ok(action):
    try:
        action()
        return True
    except (OSError, Failure, subprocess.SubprocessError):
        return False


if __name__ == "__main__":
    # `timeout` sends SIGTERM: stop the children on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        main()
    except Failure as failure:
        log(f"monitoring test failed: {failure}")
        for name in ("idemd-a", "idemd-b", "prometheus"):
            path = ROOT / f"{name}.log"
            if path.exists():
                print(f"--- last lines of {name}.log", file=sys.stderr)
                print("\n".join(path.read_text(errors="replace").splitlines()[-25:]), file=sys.stderr)
        sys.exit(1)
