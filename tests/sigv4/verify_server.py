"""An HTTP endpoint for the tests of AWS-signed calls: it recomputes each request's
Signature Version 4 with botocore's signer (an implementation independent of the one under
test) from the access key and secret it is given, and answers 200 when the signature and
the body's x-amz-content-sha256 match, 403 otherwise. The answer says what it checked:
{"verified": bool, "why": ..., "service": ..., "region": ..., "signed_headers": [...],
 "token": bool}.

Usage: verify_server.py ACCESS_KEY SECRET_KEY [SESSION_TOKEN]; prints its port on stdout.
A path starting with /unavailable answers 503 (after checking) to a task's first attempt,
so that a retried attempt is signed again.
"""

import hashlib
import json
import re
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

ACCESS_KEY, SECRET_KEY = sys.argv[1], sys.argv[2]
TOKEN = sys.argv[3] if len(sys.argv) > 3 else None
AUTHORIZATION = re.compile(
    r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, "
    r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})"
)
seen_tasks = set()


def verify(method, path, headers, body):
    """(ok, why, details) for one request; headers keyed in lower case."""
    match = AUTHORIZATION.fullmatch(headers.get("authorization", ""))
    if not match:
        return False, "no SigV4 Authorization header", {}
    key, date, region, service, signed, signature = match.groups()
    details = {
        "service": service,
        "region": region,
        "signed_headers": signed.split(";"),
        "token": "x-amz-security-token" in headers,
    }
    if key != ACCESS_KEY:
        return False, f"signed with access key {key}", details
    if headers.get("x-amz-content-sha256") != hashlib.sha256(body).hexdigest():
        return False, "x-amz-content-sha256 is not the body's SHA-256", details
    if TOKEN is not None and headers.get("x-amz-security-token") != TOKEN:
        return False, "x-amz-security-token is not the session token", details
    if not headers.get("x-amz-date", "").startswith(date):
        return False, "x-amz-date does not match the credential scope", details
    names = signed.split(";")
    missing = [n for n in names if n not in headers]
    if missing:
        return False, f"signed headers not sent: {missing}", details
    request = AWSRequest(
        method=method,
        url=f"http://{headers['host']}{path}",
        data=body,
        headers={n: headers[n] for n in names},
    )
    request.context["timestamp"] = headers["x-amz-date"]
    signer = SigV4Auth(Credentials(ACCESS_KEY, SECRET_KEY, TOKEN), service, region)
    canonical = signer.canonical_request(request)
    expected = signer.signature(signer.string_to_sign(request, canonical), request)
    if expected != signature:
        return False, f"signature mismatch; botocore's canonical request:\n{canonical}", details
    return True, "", details


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def handle_any(self):
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v.strip() for k, v in self.headers.items()}
        ok, why, details = verify(self.command, self.path, headers, body)
        status = 200 if ok else 403
        task = (headers.get("doparallel-job-id"), headers.get("doparallel-task"))
        if ok and self.path.startswith("/unavailable") and task not in seen_tasks:
            seen_tasks.add(task)
            status = 503
        answer = json.dumps({"verified": ok, "why": why, **details}).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = handle_any

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
