"""moto's server, one request at a time: python3 moto_server.py HOST PORT

moto's own server (python3 -m moto.server) handles requests on threads without isolation
between them, so two conditional writes to one item can both pass their condition. DynamoDB
itself never lets that happen (a conditional write is atomic, a transaction serializable),
and the DoParallel tests of several nodes depend on it: this runs the same application
with a lock around each request.
"""

import sys
import threading

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import run_simple


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    app = DomainDispatcherApplication(create_backend_app)
    lock = threading.Lock()

    def serial(environ, start_response):
        with lock:
            # The whole body is produced under the lock.
            return [b"".join(app(environ, start_response))]

    run_simple(host, port, serial, threaded=True)


if __name__ == "__main__":
    main()
