"""OpenStack's gear (PyPI `gear` 0.16) as a TLS client or worker, for tests/tls.rs.

    gear_tls.py worker HOST PORT CERT KEY CA FUNCTION...   runs jobs (result: the payload
        reversed) until killed; prints "ready" once registered and "ran FUNCTION PAYLOAD"
    gear_tls.py submit HOST PORT CERT KEY CA FUNCTION PAYLOAD [background]
        prints "result R" (foreground), "queued HANDLE" (background) or "refused CODE TEXT"
        (exit 3); exit 4 if no answer comes in time.
"""

import os
import sys
import time

import gear


class Client(gear.Client):
    """Remembers the ERROR packet a submission got (gear only logs it)."""

    error = None

    def handleError(self, packet):
        self.error = (packet.getArgument(0).decode(), packet.getArgument(1).decode())
        return super().handleError(packet)


def worker(host, port, cert, key, ca, functions):
    w = gear.Worker("gear-tls-worker")
    w.addServer(host, int(port), ssl_key=key, ssl_cert=cert, ssl_ca=ca)
    w.waitForServer()
    for f in functions:
        w.registerFunction(f)
    print("ready", flush=True)
    while True:
        job = w.getJob()
        print("ran", job.name, job.arguments.decode(), flush=True)
        job.sendWorkComplete(job.arguments[::-1])


def submit(host, port, cert, key, ca, function, payload, background=False):
    c = Client("gear-tls-client")
    c.addServer(host, int(port), ssl_key=key, ssl_cert=cert, ssl_ca=ca)
    c.waitForServer(timeout=10)
    job = gear.Job(function.encode(), payload.encode())
    try:
        c.submitJob(job, background=background, timeout=10)
    except gear.GearmanError as e:
        if c.error:
            print("refused", *c.error, flush=True)
            sys.exit(3)
        raise e
    if background:
        print("queued", job.handle.decode(), flush=True)
        return
    deadline = time.time() + 15
    while not job.complete and time.time() < deadline:
        time.sleep(0.02)
    if not job.complete:
        sys.exit(4)
    print("result", b"".join(job.data).decode(), flush=True)


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "worker":
        worker(*args[:5], args[5:])
    else:
        submit(*args[:7], background=args[7:] == ["background"])
    # gear's connection threads are not daemons: leave without waiting for them.
    sys.stdout.flush()
    os._exit(0)
