"""A process that imports a command line's package once and runs each command it is sent in a forked child, so
that tests which kill a command at random moments kill it in its work, not in Python's start (imports of torch,
transformers and TRL take most of a fresh process's first seconds). A fork is a whole process: SIGKILL ends it
like any other. The launcher itself runs no torch operation, so forking it is safe."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time

_LAUNCHER = """
import json, os, sys
from {module} import main
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        out = os.open(request.get("log") or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, 1)
        os.dup2(out, 2)
        try:
            code = main(request["argv"])
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 3
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(pid, flush=True)
    print("done", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class Launcher:
    """``start(argv)`` runs ``main(argv)`` of ``module`` in a fresh fork and returns its pid; ``line(timeout)``
    then gives ``"done <exit status>"`` (``-9`` after SIGKILL) once it has ended."""

    def __init__(self, module: str, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER.format(module=module)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.buffer = b""

    def line(self, timeout: float) -> str | None:
        """The next line the launcher prints, or None if none comes within ``timeout`` seconds."""
        end = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            assert chunk, "the launcher ended"
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def start(self, argv: list[str], log: str | None = None) -> int:
        """Run ``main(argv)`` in a new child (its output into the file ``log``, or discarded); its pid."""
        self.proc.stdin.write((json.dumps({"argv": argv, "log": log}) + "\n").encode())
        self.proc.stdin.flush()
        return int(self.line(300))

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
