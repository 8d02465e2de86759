"""tests/script_runner.py, which the other tests run the scripts with: a forked run gives what a new
interpreter gives."""

import os
import subprocess
import sys
import time

import pytest

from script_runner import run_script

SCRIPT = """
import os, sys
import numpy as np
import torch
print(sys.argv, os.getcwd(), sys.path[0], __file__, __name__, os.environ.get("NANO_TEST"),
      torch.get_num_threads(), sys.stdin.read())
print("stderr line", file=sys.stderr)
print("random", np.random.randint(1 << 30))
if sys.argv[1] == "exit":
    sys.exit("stopped: " + sys.argv[2])
if sys.argv[1] == "raise":
    raise ValueError("boom")
if sys.argv[1] == "code":
    sys.exit(3)
if sys.argv[1] == "sleep":
    import time
    time.sleep(30)
"""


def without_random(text):
    return [line for line in text.splitlines() if not line.startswith("random")]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks")
def test_a_forked_run_is_what_a_new_interpreter_gives(tmp_path):
    """The same outputs and exit code as subprocess.run: the arguments, working folder, sys.path[0],
    __file__ and __name__, the environment and torch's threads from OMP_NUM_THREADS, an empty stdin;
    sys.exit with a message or a code, an uncaught exception's traceback. numpy's global generator
    is seeded anew for every run, and a run past its timeout is killed."""
    (tmp_path / "s.py").write_text(SCRIPT)
    work = tmp_path / "work"
    work.mkdir()
    got = {}
    for i, args in enumerate((["ok", "a b"], ["exit", "why"], ["raise"], ["code"])):
        # one server runs them in turn: each run's thread count its own
        env = {**os.environ, "NANO_TEST": "x", "OMP_NUM_THREADS": str(2 - i % 2)}
        cmd = [sys.executable, "../s.py", *args]
        want = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=60)
        got[args[0]] = run = run_script(cmd, cwd=work, env=env, timeout=60)
        assert run.returncode == want.returncode, (args, run.stderr)
        assert run.stderr == want.stderr, args
        assert without_random(run.stdout) == without_random(want.stdout), args
    # what was compared is what it should be
    assert [got[k].returncode for k in ("ok", "exit", "raise", "code")] == [0, 1, 1, 3]
    assert got["ok"].stdout.startswith(f"['../s.py', 'ok', 'a b'] {work} {tmp_path} "
                                       f"{work / '..' / 's.py'} __main__ x 2 \n"), got["ok"].stdout
    assert " x 1 \n" in got["exit"].stdout
    assert got["exit"].stderr == "stderr line\nstopped: why\n"
    assert got["raise"].stderr.startswith("stderr line\nTraceback (most recent call last):\n"
                                          f'  File "{work / ".." / "s.py"}", line 12, in <module>\n')
    assert got["raise"].stderr.endswith("ValueError: boom\n")
    assert len({run.stdout.split("random ")[1] for run in got.values()}) == 4
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_script([sys.executable, "../s.py", "sleep"], cwd=work, env=env, timeout=1)
    assert time.monotonic() - start < 20
    # and the server that ran it runs the next script
    assert run_script([sys.executable, "../s.py", "code"], cwd=work, env=env).returncode == 3
