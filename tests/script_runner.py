"""run_script: runs `python script.py args` as subprocess.run does, but in a process forked from a
server that has already imported torch and numpy. A run then starts in ~0.05 s instead of the ~1.5 s
that importing torch takes, which the suite's ~200 script runs would otherwise spend (~2 minutes of
a test run on 2 cores).

The forked child sets up what a new interpreter would have: the working folder, the environment
(torch's thread count from OMP_NUM_THREADS), fresh random seeds, sys.argv, sys.path (the script's
folder, then the interpreter's defaults), stdin from /dev/null and stdout and stderr to files; and it
exits as Python does (SystemExit's code; a traceback and 1 for an uncaught exception; atexit
handlers run). What differs: torch and numpy are imported already, and every run has the server's
hash seed. A command that is not a script run by this Python starts a new interpreter instead; so
do the tests that kill or interrupt a run (they use subprocess directly).

A server runs one script at a time, and only with the environment it was started with (but for the
settings the child applies): each thread that runs scripts at once, and each other environment, gets
a server of its own.
`python tests/script_runner.py` is a server: it reads one JSON request per line on stdin and answers
each with the child's pid, then its exit status."""

import atexit
import importlib.machinery
import json
import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types

# the child applies these itself; pytest changes the last one for every test
SET_IN_CHILD = {"OMP_NUM_THREADS", "PYTHONUNBUFFERED", "PYTEST_CURRENT_TEST"}


def run_child(argv, cwd, env, default_path, out_path, err_path):
    """In the forked child: what `python argv...` does in cwd with env. Never returns."""
    code = 1
    try:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, out_path, os.O_WRONLY),
                                (2, err_path, os.O_WRONLY)):
            f = os.open(path, flags)
            os.dup2(f, fd)
            os.close(f)
        if env.get("PYTHONUNBUFFERED"):
            sys.stdout.reconfigure(write_through=True)
            sys.stderr.reconfigure(write_through=True)
        import numpy as np
        import torch
        if env.get("OMP_NUM_THREADS", "").isdigit():
            torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
        random.seed()
        np.random.seed()  # a new process's global generators are seeded from the OS
        # as the interpreter sets them: __file__ made absolute (not normalised), argv[0] as
        # given, sys.path[0] the script's real folder
        script = os.path.join(os.getcwd(), argv[0])
        sys.argv = list(argv)
        sys.path[:] = [os.path.dirname(os.path.realpath(script))] + default_path
        main = types.ModuleType("__main__")
        main.__file__, main.__cached__ = script, None
        main.__loader__ = importlib.machinery.SourceFileLoader("__main__", script)
        sys.modules["__main__"] = main
        code = 0
        try:
            with open(script, "rb") as f:
                source = f.read()
            exec(compile(source, script, "exec"), main.__dict__)
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException as e:
            tb = e.__traceback__  # from the script's frame on, as the interpreter prints it
            while tb.tb_next and tb.tb_frame.f_code.co_filename != script:
                tb = tb.tb_next
            traceback.print_exception(type(e), e, tb)
            code = 1
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve():
    """The server's loop: fork a child per request, report its pid, wait, report its status."""
    import numpy  # noqa: F401  (what the children are spared)
    import torch  # noqa: F401
    default_path = sys.path[1:]  # the interpreter's own, after this script's folder
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run_child(default_path=default_path, **request)
        print(pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), flush=True)


_idle = {}  # servers not running a script now, by the environment they were started with
_idle_lock = threading.Lock()


def _server(env):
    """An idle server whose environment is env's (but for SET_IN_CHILD), or a new one."""
    key = tuple(sorted((k, v) for k, v in env.items() if k not in SET_IN_CHILD))
    with _idle_lock:
        if _idle.get(key):
            return key, _idle[key].pop()
    server = subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, bufsize=0, env=env)
    atexit.register(server.stdin.close)  # its loop ends, and so does the server
    return key, server


def _read_line(server, timeout=None):
    """The server's next line, or None if it has not come within timeout seconds. Read a byte at a
    time: a buffered reader could hold the next line where select does not see it."""
    fd, line = server.stdout.fileno(), b""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not line.endswith(b"\n"):
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not select.select([fd], [], [], wait)[0]:
            return None
        byte = os.read(fd, 1)
        if not byte:
            raise RuntimeError(f"script_runner: the server (pid {server.pid}) stopped")
        line += byte
    return line


def run_script(cmd, cwd, env=None, timeout=None):
    """subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout),
    forked from a server where cmd is [sys.executable, "some.py", ...]."""
    env = dict(os.environ if env is None else env)
    if not (len(cmd) >= 2 and cmd[0] == sys.executable and cmd[1].endswith(".py")
            and hasattr(os, "fork")):
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    key, server = _server(env)
    with tempfile.TemporaryDirectory() as tmp:
        out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        for path in (out_path, err_path):
            open(path, "w").close()
        request = dict(argv=list(cmd[1:]), cwd=str(cwd), env=env, out_path=out_path,
                       err_path=err_path)
        server.stdin.write(json.dumps(request).encode() + b"\n")
        pid = int(_read_line(server))
        status = _read_line(server, timeout)
        timed_out = status is None
        if timed_out:
            os.kill(pid, signal.SIGKILL)
            status = _read_line(server)
        with _idle_lock:
            _idle.setdefault(key, []).append(server)
        if timed_out:
            raise subprocess.TimeoutExpired(cmd, timeout)
        stdout, stderr = (open(p, encoding="utf-8", errors="replace").read()
                          for p in (out_path, err_path))
    return subprocess.CompletedProcess(cmd, int(status), stdout, stderr)


if __name__ == "__main__":
    serve()
