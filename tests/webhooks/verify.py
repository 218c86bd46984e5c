"""Checks DoParallel's signed calls with the official Standard Webhooks library, as an
independent verifier.

Starts `doparallel serve` with two callback secrets and two task secrets (rotations), a
local receiver that records every request it gets, and submits jobs with random parameters
whose tasks call the receiver and whose callbacks go to it. Every recorded callback must
verify with each callback secret and every task call with each task secret, and neither with
the other's; the same call with its body, timestamp or secret changed must not verify.

Then the attack of one tenant on another: two API tokens, each with a callback secret of its
own (the token file's `TOKEN whsec_...`). Tenant A submits a task whose params are a forged
callback document for tenant B's job, sent to A's own collector; replayed with its signed
headers to B's receiver, it must not verify with B's secret (nor with the server's).

Usage: python3 tests/webhooks/verify.py [path to the doparallel binary]
"""

import json
import os
import random
import re
import string
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

JOBS = 20
DEADLINE = 60


class Recorder(BaseHTTPRequestHandler):
    calls = []
    lock = threading.Lock()

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        with Recorder.lock:
            Recorder.calls.append((self.path, dict(self.headers.items()), body))
        answer = b'{"ok":true}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


def random_params():
    """Random JSON: unicode text, big and small numbers, nesting."""
    alphabet = string.printable + "éü漢字🙂\u2028"
    return {
        "text": "".join(random.choice(alphabet) for _ in range(random.randint(0, 200))),
        "n": random.randint(-(10**30), 10**30),
        "f": random.uniform(-1e6, 1e6),
        "list": [random.random() for _ in range(random.randint(0, 5))],
    }


def new_secret(binary):
    return subprocess.check_output([binary, "secret"], text=True).strip()


def start_server(binary, work, args):
    """`doparallel serve` on a fresh database with `args`; the process and its address."""
    server = subprocess.Popen(
        [binary, "serve", "--listen", "127.0.0.1:0",
         "--database", f"sqlite://{work}/db",
         "--allow-net", "127.0.0.0/8", *args],
        stderr=subprocess.PIPE, text=True,
    )
    for line in server.stderr:
        m = re.search(r"listening on ([0-9.:]+)", line)
        if m:
            threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
            return server, m.group(1)
    raise SystemExit("the server did not start")


def submit(addr, job, token=None):
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    req = urllib.request.Request(
        f"http://{addr}/v1/job", data=json.dumps(job).encode(), headers=headers, method="POST")
    with urllib.request.urlopen(req) as resp:
        assert resp.status == 202, resp.status
        return json.load(resp)["job_id"]


def wait_for(what, count):
    """Waits until the receiver has `count` requests whose path is `what`."""
    start = time.monotonic()
    while True:
        with Recorder.lock:
            seen = [c for c in Recorder.calls if c[0] == what]
        if len(seen) >= count:
            return seen
        if time.monotonic() - start > DEADLINE:
            raise SystemExit(f"only {len(seen)} of {count} {what} requests arrived")
        time.sleep(0.05)


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else "target/debug/doparallel"
    secrets = [new_secret(binary) for _ in range(2)]
    task_secrets = [new_secret(binary) for _ in range(2)]
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    base_receiver = f"http://127.0.0.1:{receiver.server_address[1]}"

    with tempfile.TemporaryDirectory() as work:
        server, addr = start_server(binary, work, [
            "--webhook-secret", secrets[0], "--webhook-secret", secrets[1],
            "--task-secret", task_secrets[0], "--task-secret", task_secrets[1]])
        try:
            for _ in range(JOBS):
                submit(addr, {
                    "callback": f"{base_receiver}/callback",
                    "tasks": [{"endpoint": f"{base_receiver}/task", "params": random_params()}
                              for _ in range(2)],
                })
            wait_for("/callback", JOBS)
        finally:
            server.terminate()
            server.wait(timeout=30)

    passed = failed = 0

    def expect(ok, what):
        nonlocal passed, failed
        if ok:
            passed += 1
        else:
            failed += 1
            print(f"FAILED: {what}")

    def refused(webhook, data, hdrs, what):
        try:
            webhook.verify(data, hdrs)
            expect(False, f"{what} still verifies")
        except WebhookVerificationError:
            expect(True, "")

    stranger = Webhook(new_secret(binary))
    with Recorder.lock:
        calls = list(Recorder.calls)
        Recorder.calls.clear()
    expect(len(calls) == JOBS * 3, f"{len(calls)} calls recorded, {JOBS * 3} expected")
    for path, headers, body in calls:
        headers = {k.lower(): v for k, v in headers.items()}
        expect(len(headers.get("webhook-signature", "").split(" ")) == 2,
               f"{path}: one signature per secret")
        # Callbacks with the callback secrets only, task calls with the task secrets only.
        mine, others = (secrets, task_secrets) if path == "/callback" else (task_secrets, secrets)
        for secret in mine:
            try:
                Webhook(secret).verify(body, headers)
                expect(True, "")
            except WebhookVerificationError as e:
                expect(False, f"{path}: a genuine call does not verify: {e}")
        for secret in others:
            refused(Webhook(secret), body, headers, f"{path}: the other kind's secret")
        wh = Webhook(mine[0])
        refused(wh, body + b" ", headers, f"{path}: a changed body")
        later = dict(headers, **{"webhook-timestamp": str(int(headers["webhook-timestamp"]) + 1)})
        refused(wh, body, later, f"{path}: a changed timestamp")
        refused(stranger, body, headers, f"{path}: another secret")

    # Tenant A forges a callback for tenant B's job and has the server sign it as a task call.
    tokens = {"a": "tenant-a-token-0123456789", "b": "tenant-b-token-0123456789"}
    tenant_secrets = {name: new_secret(binary) for name in tokens}
    with tempfile.TemporaryDirectory() as work:
        token_file = os.path.join(work, "tokens")
        with open(token_file, "w") as f:
            for name, token in tokens.items():
                f.write(f"{token} {tenant_secrets[name]}\n")
        server, addr = start_server(binary, work, [
            "--api-token-file", token_file,
            "--webhook-secret", secrets[0], "--task-secret", task_secrets[0]])
        try:
            victim = submit(addr, {"callback": f"{base_receiver}/b-receiver",
                                   "tasks": [{"endpoint": "/v1/test", "params": {"x": 1}}]},
                            tokens["b"])
            genuine = wait_for("/b-receiver", 1)[0]
            forged = {"job_id": victim, "status": "Complete", "msg": "Job Finished",
                      "result": {"1": {"status": "Complete", "result": {"x": "forged"}}}}
            submit(addr, {"tasks": [{"endpoint": f"{base_receiver}/a-collector",
                                     "params": forged}]}, tokens["a"])
            replay = wait_for("/a-collector", 1)[0]
        finally:
            server.terminate()
            server.wait(timeout=30)
            receiver.shutdown()
    b_receiver = Webhook(tenant_secrets["b"])
    _, headers, body = genuine
    headers = {k.lower(): v for k, v in headers.items()}
    try:
        b_receiver.verify(body, headers)
        expect(True, "")
    except WebhookVerificationError as e:
        expect(False, f"tenant B's genuine callback does not verify with B's secret: {e}")
    refused(Webhook(secrets[0]), body, headers, "tenant B's callback with the server's secret")
    _, headers, body = replay
    headers = {k.lower(): v for k, v in headers.items()}
    expect(json.loads(body)["job_id"] == victim, "the forged document names B's job")
    refused(b_receiver, body, headers, "a forged callback replayed to tenant B")
    refused(Webhook(secrets[0]), body, headers, "a forged callback with the server's secret")
    refused(Webhook(tenant_secrets["a"]), body, headers, "a forged callback with A's secret")

    print(f"webhooks: {passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
