"""Shared test set-up: the repo root on sys.path, and small prepared corpora for every test file:
`synth_dir` (the built-in corpus's kinds) and `dtmf_dir` (keypad numbers only); `synth_c0` adds
synth_dir's codebook-0 mels, and `multinomial_draws` records what samplers draw."""
import os
import sys
import time
import shutil
import hashlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# With pytest-xdist (-n N), each of the N workers gets its share of the cores, for torch and for
# the scripts the tests run: torch's default, a thread per core in every worker, would oversubscribe
# them.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    THREADS = max(1, (cores or 1) // WORKERS)  # the cores this process may use, as -n auto counts
    os.environ["OMP_NUM_THREADS"] = str(THREADS)
    import torch
    torch.set_num_threads(THREADS)

# A small built-in corpus: ~160 clips of up to 2 s (~4 minutes of audio), codec fitted on a sample.
SYNTH_ARGS = ["--clips=160", "--max_seconds=2.0", "--kmeans_frames=8192", "--kmeans_iters=6",
              "--quiet", "--offline",
              "--codec_steps=12", "--codec_clips=32", "--codec_tune_steps=6", "--codec_report=0"]


# A corpus of DTMF numbers only, 30% held out: enough keypad numbers (~140 to train on, ~60 held
# out) for SALMONN's pipeline in miniature to transcribe unseen ones.
DTMF_ARGS = ["--kinds=dtmf", "--clips=200", "--max_seconds=2.0", "--val_percent=30",
             "--kmeans_frames=4096", "--kmeans_iters=4", "--quiet", "--offline", "--codec_steps=6",
             "--codec_clips=16", "--codec_tune_steps=3", "--codec_report=0"]


def prepared_corpus(request, tmp_path_factory, name, args):
    """prepare.py's output for args, built once and kept in pytest's cache dir, keyed by the code
    that makes it (prepare.py, audio.py, codec.py, synth.py, tokenizer.py), so the test files share
    it; NANO_AUDIO_FRESH_DATA=1 builds it in a fresh tmp dir instead."""
    import prepare
    fresh = os.environ.get("NANO_AUDIO_FRESH_DATA") == "1"
    if fresh or getattr(request.config, "cache", None) is None:
        out = tmp_path_factory.mktemp(name)
    else:
        files = ("prepare.py", "audio.py", "codec.py", "synth.py", "tokenizer.py")
        code = b"".join((ROOT / f).read_bytes() for f in files)
        key = hashlib.md5(code + " ".join(args).encode()).hexdigest()[:12]
        out = Path(request.config.cache.mkdir(f"{name}-{key}"))
        # corpora of earlier versions (written over an hour ago)
        for old in out.parent.glob(f"{name}-" + "?" * 12):
            if old != out and time.time() - old.stat().st_mtime > 3600:
                shutil.rmtree(old, ignore_errors=True)
    from filelock import FileLock  # one builder at a time: workers of pytest -n share the cache
    with FileLock(f"{out}.lock"):
        prepare.main(args + [f"--out_dir={out}"])  # returns at once if already complete there
    return str(out)


@pytest.fixture(scope="session")
def synth_dir(request, tmp_path_factory):
    """Path of a data/synth-like corpus (meta.json, {train,val}_{codes,mel}.bin, *_clips.jsonl,
    tokenizer, codec)."""
    return prepared_corpus(request, tmp_path_factory, "synth", SYNTH_ARGS)


@pytest.fixture(scope="session")
def dtmf_dir(request, tmp_path_factory):
    """Path of a prepared corpus of DTMF numbers only (DTMF_ARGS)."""
    return prepared_corpus(request, tmp_path_factory, "dtmf", DTMF_ARGS)


@pytest.fixture(scope="session")
def synth_c0(synth_dir):
    """synth_dir's codebook-0 mels ({split}_mel_c0.bin, prepare.codebook0_mels), made once: the
    workers of pytest -n take turns, so that one decodes and the others find the files."""
    import prepare
    from filelock import FileLock
    with FileLock(f"{synth_dir}.c0.lock"):
        prepare.codebook0_mels(synth_dir, quiet=True)


@pytest.fixture
def multinomial_draws(monkeypatch):
    """[(probabilities, drawn index)] of every torch.multinomial call in the test: what a sampler
    draws from."""
    import torch
    draws, multinomial = [], torch.multinomial

    def spy(probs, n, **kw):
        out = multinomial(probs, n, **kw)
        draws.append((probs.detach().clone(), out.clone()))
        return out

    monkeypatch.setattr(torch, "multinomial", spy)
    return draws
