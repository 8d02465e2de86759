"""tests/script_runner.py, which the other tests run the scripts with: a forked run gives what a new
interpreter gives."""

import os
import subprocess
import sys
import time

import pytest

from script_runner import run_script

SCRIPT = """
import atexit, os, random, sys, threading, time
import numpy as np
import torch
print(sys.argv, os.getcwd(), sys.path, __file__, __name__, os.environ.get("NANO_TEST"),
      torch.get_num_threads(), repr(sys.stdin.read()))
print("stderr line", file=sys.stderr)
print("random", np.random.randint(1 << 30), random.random())
atexit.register(print, "atexit ran")
threading.Thread(target=lambda: (time.sleep(0.3), print("late thread done"))).start()
log = open("unclosed.txt", "w")
log.write("kept")  # never closed: the interpreter flushes it at exit
if sys.argv[1] == "exit":
    sys.exit("stopped: " + sys.argv[2])
if sys.argv[1] == "raise":
    raise ValueError("boom")
if sys.argv[1] == "code":
    sys.exit(3)
if sys.argv[1] == "none":
    sys.exit()
if sys.argv[1] == "sleep":
    time.sleep(30)
if sys.argv[1] == "hard":  # no flush at exit: the output is there only if unbuffered
    print("written before a hard exit")
    os._exit(4)
"""


def without_random(text):
    return [line for line in text.splitlines() if not line.startswith("random")]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks")
def test_a_forked_run_is_what_a_new_interpreter_gives(tmp_path):
    """The same outputs, exit code and files as subprocess.run: the arguments, working folder,
    sys.path, __file__ and __name__, the environment and torch's threads, an empty stdin; sys.exit
    with a message, a code or none, an uncaught exception's traceback, a missing script; threads
    joined, atexit handlers run and open files flushed at the end. Random generators are seeded
    anew for every run, and a run past its timeout is killed."""
    (tmp_path / "s.py").write_text(SCRIPT)
    work = tmp_path / "work"
    work.mkdir()
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "PYTHONUNBUFFERED")}
    got = {}
    for args, env in ((["ok", "a b"], {"OMP_NUM_THREADS": "2"}), (["exit", "why"], {}),
                      (["raise"], {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}),
                      (["code"], {"OMP_NUM_THREADS": "1"}), (["none"], {"OMP_NUM_THREADS": "1"})):
        env = {**base, "NANO_TEST": "x", **env}
        cmd = [sys.executable, "../s.py", *args]
        want = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=60)
        want_file = (work / "unclosed.txt").read_text()
        (work / "unclosed.txt").unlink()
        got[args[0]] = run = run_script(cmd, cwd=work, env=env, timeout=60)
        assert run.returncode == want.returncode, (args, run.stderr)
        assert run.stderr == want.stderr, args
        assert without_random(run.stdout) == without_random(want.stdout), args
        assert (work / "unclosed.txt").read_text() == want_file == "kept", args
    # what was compared is what it should be
    script = work / ".." / "s.py"  # as the interpreter names it: made absolute, not normalised
    assert [got[k].returncode for k in ("ok", "exit", "raise", "code", "none")] == [0, 1, 1, 3, 0]
    first = got["ok"].stdout.splitlines()[0]
    assert first.startswith(f"['../s.py', 'ok', 'a b'] {work} ['{tmp_path}', "), first
    assert first.endswith(f"] {script} __main__ x 2 ''"), first
    assert got["code"].stdout.splitlines()[0].endswith(" x 1 ''")
    assert got["exit"].stderr == "stderr line\nstopped: why\n"
    assert got["raise"].stderr.startswith("stderr line\nTraceback (most recent call last):\n"
                                          f'  File "{script}", line 16, in <module>\n')
    assert got["raise"].stderr.endswith("ValueError: boom\n")
    assert all(run.stdout.endswith("late thread done\natexit ran\n") for run in got.values())
    draws = [run.stdout.split("random ")[1].split()[:2] for run in got.values()]
    assert all(len(set(draw)) == 5 for draw in zip(*draws)), draws  # numpy's and random's
    # a hard exit keeps what was printed under PYTHONUNBUFFERED only, as in a new interpreter
    for unbuffered in ({}, {"PYTHONUNBUFFERED": "1"}):
        env = {**base, **unbuffered}
        cmd = [sys.executable, "../s.py", "hard"]
        want = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=60)
        run = run_script(cmd, cwd=work, env=env, timeout=60)
        assert run.returncode == want.returncode == 4
        assert without_random(run.stdout) == without_random(want.stdout)
        assert ("written before a hard exit" in run.stdout) == bool(unbuffered), run.stdout
    # a working folder that is not there: the same error as subprocess.run's
    for runner in (subprocess.run, run_script):
        with pytest.raises(FileNotFoundError, match="nowhere"):
            runner([sys.executable, "../s.py", "ok"], cwd=tmp_path / "nowhere")
    # a script that is not there
    cmd = [sys.executable, "../none.py"]
    want = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=60)
    run = run_script(cmd, cwd=work, timeout=60)
    assert (run.returncode, run.stdout, run.stderr) == (want.returncode, want.stdout, want.stderr)
    assert run.returncode == 2 and "can't open file" in run.stderr
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_script([sys.executable, "../s.py", "sleep"], cwd=work, env=env, timeout=1)
    assert time.monotonic() - start < 20
    # and the server that ran it runs the next script
    assert run_script([sys.executable, "../s.py", "code"], cwd=work, env=env).returncode == 3
