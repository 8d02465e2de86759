"""run_script: runs `python script.py args` as subprocess.run does, but in a process forked from a
server that has already imported torch and numpy. A run then starts in ~0.05 s instead of the ~1.5 s
that importing torch takes, which the suite's ~200 script runs would otherwise spend (~2 minutes of
a test run on 2 cores).

The child sets up what a new interpreter has (working folder, environment, sys.argv, sys.path,
__main__, stdin from /dev/null, stdout and stderr to files) and ends as one does: non-daemon threads
joined, atexit handlers, the script's globals freed, SystemExit's code, a traceback and 1 for an
uncaught exception, 2 for a missing script. What differs: torch and numpy are imported already,
every run of a server has its hash seed, and Ctrl-C exits with 1, not by the signal (the tests that
kill or interrupt a run use subprocess). A command that is not a script run by this Python starts a
new interpreter.

A server runs one script at a time, in the environment it was started with (PYTEST_CURRENT_TEST
aside), so what an interpreter reads as it starts (PYTHONUNBUFFERED, OMP_NUM_THREADS) is the run's:
each thread that runs scripts at once, and each other environment, gets a server of its own.
`python tests/script_runner.py` is a server: it reads one JSON request per line on stdin and
answers each with the child's pid, then its exit status."""

import atexit
import concurrent.futures
import gc
import importlib.machinery
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types


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
        # as the interpreter sets them: __file__ made absolute (not normalised), argv[0] as
        # given, sys.path[0] the script's real folder
        script = os.path.join(os.getcwd(), argv[0])
        sys.argv = list(argv)
        sys.path[:] = [os.path.dirname(os.path.realpath(script))] + default_path
        main = types.ModuleType("__main__")
        main.__file__, main.__cached__ = script, None
        main.__loader__ = importlib.machinery.SourceFileLoader("__main__", script)
        sys.modules["__main__"] = main
        try:
            with open(script, "rb") as f:
                source = f.read()
        except OSError as e:
            print(f"{sys.executable}: can't open file {script!r}: [Errno {e.errno}] "
                  f"{e.strerror}", file=sys.stderr)
            code = 2
            return
        code = 0
        try:
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
        threading._shutdown()  # what the interpreter does at exit: join non-daemon threads
        atexit._run_exitfuncs()
        main.__dict__.clear()  # the script's objects freed (its open files flushed and closed)
        gc.collect()
    except BaseException:  # the runner's own failure
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve():
    """The server's loop: fork a child per request, report its pid, wait, report its status."""
    # what the children are spared; not numpy.random nor random, which seed themselves from the OS
    # when a child first imports them
    import numpy  # noqa: F401
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


def _stop(server):
    server.stdin.close()  # its loop ends
    server.wait()


def _take_server(env):
    """An idle server started with env (PYTEST_CURRENT_TEST aside), or a new one; and its key."""
    key = tuple(sorted((k, v) for k, v in env.items() if k != "PYTEST_CURRENT_TEST"))
    with _idle_lock:
        while _idle.get(key):
            server = _idle[key].pop()
            if server.poll() is None:  # still there
                return key, server
    server = subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, bufsize=0, env=env)
    atexit.register(_stop, server)
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
    if not os.path.isdir(cwd):  # as Popen says it
        raise FileNotFoundError(2, "No such file or directory", str(cwd))
    key, server = _take_server(env)
    with tempfile.TemporaryDirectory() as tmp:
        out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        for path in (out_path, err_path):
            open(path, "w").close()
        request = dict(argv=list(cmd[1:]), cwd=str(cwd), env=env, out_path=out_path,
                       err_path=err_path)
        server.stdin.write(json.dumps(request).encode() + b"\n")
        pid = int(_read_line(server))
        try:
            status = _read_line(server, timeout)
        except BaseException:  # Ctrl-C or a test's timeout: the run ends with the test
            os.kill(pid, signal.SIGKILL)
            raise
        if status is None:  # past its timeout
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # it ended just now
                pass
            _read_line(server)
        with _idle_lock:
            _idle.setdefault(key, []).append(server)
        if status is None:
            raise subprocess.TimeoutExpired(cmd, timeout)
        stdout, stderr = (open(p, encoding="utf-8", errors="replace").read()
                          for p in (out_path, err_path))
    return subprocess.CompletedProcess(cmd, int(status), stdout, stderr)


def run_scripts(cmds, cwd, env=None, timeout=None, jobs=2):
    """run_script for independent commands, `jobs` at a time; their results, in order."""
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(lambda cmd: run_script(cmd, cwd, env, timeout), cmds))


if __name__ == "__main__":
    serve()
