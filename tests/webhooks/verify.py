"""Checks DoParallel's signed calls with the official Standard Webhooks library, as an
independent verifier.

Starts `doparallel serve` with two signing secrets (a rotation), a local receiver that
records every request it gets, and submits jobs with random parameters whose tasks call the
receiver and whose callbacks go to it. Every recorded call must verify with each secret; the
same call with its body, timestamp or secret changed must not.

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


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else "target/debug/doparallel"
    secrets = [subprocess.check_output([binary, "secret"], text=True).strip() for _ in range(2)]
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    base_receiver = f"http://127.0.0.1:{receiver.server_address[1]}"

    with tempfile.TemporaryDirectory() as work:
        server = subprocess.Popen(
            [binary, "serve", "--listen", "127.0.0.1:0",
             "--database", f"sqlite://{work}/db",
             "--allow-net", "127.0.0.0/8",
             "--webhook-secret", secrets[0], "--webhook-secret", secrets[1]],
            stderr=subprocess.PIPE, text=True,
        )
        try:
            addr = None
            for line in server.stderr:
                m = re.search(r"listening on ([0-9.:]+)", line)
                if m:
                    addr = m.group(1)
                    break
            if addr is None:
                raise SystemExit("the server did not start")
            threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()

            for _ in range(JOBS):
                job = {
                    "callback": f"{base_receiver}/callback",
                    "tasks": [{"endpoint": f"{base_receiver}/task", "params": random_params()}
                              for _ in range(2)],
                }
                req = urllib.request.Request(
                    f"http://{addr}/v1/job", data=json.dumps(job).encode(),
                    headers={"content-type": "application/json"}, method="POST")
                with urllib.request.urlopen(req) as resp:
                    assert resp.status == 202, resp.status

            start = time.monotonic()
            while True:
                with Recorder.lock:
                    callbacks = sum(1 for path, _, _ in Recorder.calls if path == "/callback")
                if callbacks >= JOBS:
                    break
                if time.monotonic() - start > DEADLINE:
                    raise SystemExit(f"only {callbacks} of {JOBS} callbacks arrived")
                time.sleep(0.05)
        finally:
            server.terminate()
            server.wait(timeout=30)
            receiver.shutdown()

    passed = failed = 0

    def expect(ok, what):
        nonlocal passed, failed
        if ok:
            passed += 1
        else:
            failed += 1
            print(f"FAILED: {what}")

    stranger = Webhook(subprocess.check_output([binary, "secret"], text=True).strip())
    with Recorder.lock:
        calls = list(Recorder.calls)
    expect(len(calls) == JOBS * 3, f"{len(calls)} calls recorded, {JOBS * 3} expected")
    for path, headers, body in calls:
        headers = {k.lower(): v for k, v in headers.items()}
        expect(len(headers.get("webhook-signature", "").split(" ")) == 2,
               f"{path}: one signature per secret")
        for secret in secrets:
            try:
                Webhook(secret).verify(body, headers)
                expect(True, "")
            except WebhookVerificationError as e:
                expect(False, f"{path}: a genuine call does not verify: {e}")

        def refused(webhook, data, hdrs, what):
            try:
                webhook.verify(data, hdrs)
                expect(False, f"{path}: {what} still verifies")
            except WebhookVerificationError:
                expect(True, "")

        wh = Webhook(secrets[0])
        refused(wh, body + b" ", headers, "a changed body")
        later = dict(headers, **{"webhook-timestamp": str(int(headers["webhook-timestamp"]) + 1)})
        refused(wh, body, later, "a changed timestamp")
        refused(stranger, body, headers, "another secret")

    print(f"webhooks: {passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
