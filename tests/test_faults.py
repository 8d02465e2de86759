"""Faults: train.py and prepare.py killed with SIGKILL at random moments and run again end exactly
where an uninterrupted run does; bad checkpoints and bad audio give one clear line that names the
file."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from script_runner import run_script, run_scripts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TINY = ["--model=whisper_gpt", "--block_size=16", "--n_layer=1", "--n_head=2", "--n_embd=32",
        "--mel_n_layer=1", "--mel_n_head=2", "--mel_n_embd=16", "--mel_dim=8", "--batch_size=4",
        "--max_iters=24", "--eval_interval=2", "--eval_iters=1", "--log_interval=1",
        "--warmup_iters=2", "--learning_rate=3e-3"]

def sigint_as_usual():
    """preexec_fn of a child the test sends SIGINT: a shell's background job (`cmd &`) starts with
    SIGINT ignored, which its children keep, and Python sets its Ctrl-C handler only where SIGINT
    is not ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)

def train(out_dir, data_dir, *extra):
    return [sys.executable, "train.py", *TINY, f"--out_dir={out_dir}", f"--data_dir={data_dir}",
            *extra]

def linked_data(synth_dir, folder, leave_out=()):
    """folder made with links to synth_dir's files but those in leave_out, which the test writes
    itself: a copy of the data with one file changed, without copying the rest."""
    folder.mkdir()
    for f in os.listdir(synth_dir):
        if f not in leave_out:
            os.symlink(os.path.join(synth_dir, f), folder / f)
    return folder

def log_losses(out_dir):
    return [(r["iter"], r["loss"])
            for r in map(json.loads, open(os.path.join(out_dir, "log.jsonl"))) if "loss" in r]

def test_train_killed_at_ten_random_moments_resumes_to_the_uninterrupted_losses(synth_dir,
                                                                               tmp_path):
    """Each kill lands at a random moment of a random iteration (checkpoint saves included: one
    every 2 iterations). After every kill ckpt.pt is a complete checkpoint of an iteration already
    reached, and every loss logged by the resumed runs, re-done iterations included, equals the
    uninterrupted run's at that iteration. Every other run is the same command again, without
    --init_from=resume: a re-run resumes, and once finished it does nothing."""
    ref = tmp_path / "ref"
    p = run_script(train(ref, synth_dir), cwd=ROOT, env=ENV, timeout=300)
    assert p.returncode == 0, p.stderr
    expected = dict(log_losses(ref))
    assert sorted(expected) == list(range(1, 25))

    from train import load_checkpoint
    out, rng = tmp_path / "killed", np.random.default_rng(0)
    kills, saved = 0, 0
    # on a fast machine a random delay can span the last iterations: the run then finishes here
    while kills < 10 and saved < 24:
        resume = (out / "ckpt.pt").exists()
        proc = subprocess.Popen(train(out, synth_dir,
                                      *(["--init_from=resume"] if resume and kills % 2 else [])),
                                cwd=ROOT, env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        start = load_checkpoint(out / "ckpt.pt")["iter_num"] if resume else 0
        # kill once this iteration has begun, after a random delay
        target = start + int(rng.integers(0, 3))
        reached = start
        for line in proc.stdout:
            if line.startswith(("iter ", "step ")):
                reached = int(line.split()[1].split("/")[0].rstrip(":"))
            if reached >= target:
                time.sleep(float(rng.uniform(0, 0.05)))
                break
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        rest = proc.stdout.read()
        proc.stdout.close()
        assert killed or proc.returncode == 0, rest  # a run not killed finished by itself
        # complete, and one of the saves (every 2 iterations)
        if (out / "ckpt.pt").exists():
            saved = load_checkpoint(out / "ckpt.pt")["iter_num"]
            assert saved % 2 == 0 and start <= saved <= 24
    assert kills >= 1
    p = run_script(train(out, synth_dir), cwd=ROOT, env=ENV, timeout=300)
    said = "resuming it" if saved < 24 else "nothing to do"
    assert p.returncode == 0 and said in p.stdout, (said, p.stdout, p.stderr)
    got = log_losses(out)
    assert {it for it, _ in got} == set(expected)
    for it, loss in got:
        assert loss == expected[it], (it, loss, expected[it])
    final = load_checkpoint(out / "ckpt.pt")
    assert final["iter_num"] == 24
    ref_model = load_checkpoint(ref / "ckpt.pt")["model"]
    assert final["model"].keys() == ref_model.keys()
    assert all(torch.equal(final["model"][k], ref_model[k]) for k in ref_model)
    # finished: the same command again leaves the run as it is; other settings stop before any
    # write
    before = (out / "ckpt.pt").read_bytes(), (out / "log.jsonl").read_bytes()
    for extra, code, said in (((), 0, "nothing to do"), (("--learning_rate=1e-3",), 2,
                                                         "learning_rate=0.003 there, 0.001 here")):
        p = run_script(train(out, synth_dir, *extra), cwd=ROOT, env=ENV, timeout=300)
        assert p.returncode == code and said in p.stdout + p.stderr, (p.stdout, p.stderr)
        assert ((out / "ckpt.pt").read_bytes(), (out / "log.jsonl").read_bytes()) == before

def test_bad_checkpoints_and_bad_audio_get_one_clear_line(synth_dir, tmp_path):
    good = tmp_path / "good"
    p = run_script(train(good, synth_dir, "--max_iters=2"), cwd=ROOT, env=ENV,
                   timeout=300)
    assert p.returncode == 0, p.stderr
    data = (good / "ckpt.pt").read_bytes()
    cases = {"truncated": data[:len(data) // 2], "corrupt": data[:2000] + bytes(5000) + data[7000:],
             "empty": b"", "text": b"not a checkpoint at all\n"}
    # every command of this test is independent of the others (each stops before any write): they
    # are collected here and run side by side at the end (run_scripts), each checked as before
    checks = []  # (command, what its stderr must say)
    for name, blob in cases.items():
        d = tmp_path / name
        d.mkdir()
        (d / "ckpt.pt").write_bytes(blob)
        # the three scripts read checkpoints the same way
        scripts = [[sys.executable, "eval.py", str(d)]]
        if name == "truncated":
            scripts += [train(d, synth_dir, "--init_from=resume"),
                        [sys.executable, "sample.py", f"--out_dir={d}"]]
        said = "torch.save writes a zip archive" if name == "text" else "truncated or corrupt"
        checks += [(cmd, [str(d / "ckpt.pt"), said]) for cmd in scripts]
    blobs = {tmp_path / name / "ckpt.pt": blob for name, blob in cases.items()}
    other = tmp_path / "other"
    other.mkdir()
    torch.save({"weights": torch.zeros(3)}, other / "ckpt.pt")
    checks.append(([sys.executable, "eval.py", str(other)], ["not a checkpoint of train.py"]))
    # a checkpoint of another model: resuming or initialising a salmonn run from it is refused by
    # name
    for start in ("--init_from=resume", f"--init_from={good / 'ckpt.pt'}"):
        out = good if start.endswith("resume") else tmp_path / "s"
        checks.append(([sys.executable, "train.py", "config/salmonn_stage1.py",
                        f"--out_dir={out}", start, f"--data_dir={synth_dir}", "--asr_data_dir="],
                       ["holds a whisper_gpt model, not salmonn"]))
    # sample.py: audio that is corrupt, empty or missing, and a clip index past the end
    (tmp_path / "bad.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    (tmp_path / "empty.wav").write_bytes(b"")
    cases = ((f"--audio={tmp_path / 'bad.wav'}", "unreadable or corrupt audio"),
             (f"--audio={tmp_path / 'empty.wav'}", "unreadable or corrupt audio"),
             (f"--audio={tmp_path / 'none.wav'}", "file not found"),
             ("--clip=100000", "--clip=100000"))
    checks += [([sys.executable, "sample.py", f"--out_dir={good}", arg], [words])
               for arg, words in cases]
    # settings out of range, a model file's own check, a pretrained part's file cut short, data
    # that does not fit the checkpoint: one line that names the cause, no traceback
    (tmp_path / "cut.pt").write_bytes(data[:len(data) // 3])
    meta = json.loads(open(os.path.join(synth_dir, "meta.json")).read())
    other_data = linked_data(synth_dir, tmp_path / "codebook2048", leave_out=("meta.json",))
    (other_data / "meta.json").write_text(json.dumps({**meta, "codebook_size": 2048}))
    new = tmp_path / "new"
    (tmp_path / "a_file").write_text("")
    codec_file = meta["codec"]["weights"]
    # the data's offline codec file cut short
    cut_codec = linked_data(synth_dir, tmp_path / "cut_codec", leave_out=(codec_file,))
    codec_bytes = open(os.path.join(synth_dir, codec_file), "rb").read()
    (cut_codec / codec_file).write_bytes(codec_bytes[:len(codec_bytes) // 2])
    # meta.json without n_mels
    no_field = linked_data(synth_dir, tmp_path / "no_field", leave_out=("meta.json",))
    (no_field / "meta.json").write_text(json.dumps({k: v for k, v in meta.items()
                                                    if k != "n_mels"}))
    odd_meta = []  # meta.json of another shape: a list, a number as text
    for name, text in (("meta_list", "[]"), ("meta_text", json.dumps({**meta, "n_mels": "64"}))):
        odd_meta.append(linked_data(synth_dir, tmp_path / name, leave_out=("meta.json",)))
        (odd_meta[-1] / "meta.json").write_text(text)
    empty_val = tmp_path / "empty_val"  # a val split without clips
    empty_val.mkdir()
    for f in os.listdir(synth_dir):
        if f.startswith("val_") and f.endswith(".bin"):
            (empty_val / f).write_bytes(b"")
        else:
            os.symlink(os.path.join(synth_dir, f), empty_val / f)
    # train_codes.bin cut mid-row
    cut_codes = linked_data(synth_dir, tmp_path / "cut_codes", leave_out=("train_codes.bin",))
    codes_bytes = open(os.path.join(synth_dir, "train_codes.bin"), "rb").read()
    (cut_codes / "train_codes.bin").write_bytes(codes_bytes[:-6])
    # the same data, a codeword of its codec moved
    other_codec = linked_data(synth_dir, tmp_path / "other_codec", leave_out=(codec_file,))
    moved = torch.load(os.path.join(synth_dir, codec_file), weights_only=True)
    moved["model"][next(k for k in moved["model"] if k.endswith("_codebook.embed"))][0] += 1.0
    torch.save(moved, other_codec / codec_file)
    tampered = tmp_path / "tampered"  # a checkpoint whose weights do not fit its own model_args
    tampered.mkdir()
    ck = torch.load(good / "ckpt.pt", weights_only=True)
    ck["model"]["lm_head.weight"] = ck["model"]["lm_head.weight"][:-1]
    torch.save(ck, tampered / "ckpt.pt")
    bad_meta = tmp_path / "bad_meta"
    bad_meta.mkdir()
    (bad_meta / "meta.json").write_text("{not json")
    cases = (
            (train(new, synth_dir, "--device=gpu7"), "not a device torch knows"),
            ([sys.executable, "eval.py", str(good), "--device=nonsense"],
             "not a device torch knows"),
            (train(tmp_path / "a_file", synth_dir), "expected a folder"),
            (train(tmp_path / "a_file" / "run", synth_dir),
             f"{tmp_path / 'a_file'} is a file, not a folder"),
            ([sys.executable, "sample.py", f"--out_dir={tampered}", f"--data_dir={synth_dir}"],
             "its weights do not fit the model built for the checkpoint's model_args"),
            ([sys.executable, "train.py", "--model=configurator"], "is not a model file"),
            ([sys.executable, "sample.py", f"--out_dir={good}", f"--data_dir={bad_meta}"],
             "cannot be read as JSON"),
            (train(new, synth_dir, "--eval_interval=0"), "eval_interval=0: must be at least 1"),
            (train(new, synth_dir, "--mel_dim=0"), "mel_dim (0)"),
            # sizes the model checks before a batch of them is drawn
            (train(new, synth_dir, "--block_size=-2", "--use_mel=False"),
             "block_size=-2: must be at least 1"),
            (train(new, synth_dir, "--mel_n_embd=0"), "mel_n_embd=0: must be at least 1"),
            (train(new, synth_dir, f"--init_from={good}"),
             f"init_from='{good}': a folder; name the checkpoint in it (e.g. {good / 'ckpt.pt'})"),
            ([sys.executable, "train.py", "config/salmonn_llm.py", f"--out_dir={new}",
              f"--data_dir={synth_dir}", "--llm_block_size=-4"],
             "llm_block_size=-4: must be at least 1"),
            (train(new, os.path.join(synth_dir, "meta.json")),
             "a file, not the folder prepare.py writes"),
            ([sys.executable, "train.py", "config/salmonn_stage1.py", f"--out_dir={new}",
              f"--data_dir={synth_dir}", f"--whisper_init={tmp_path / 'cut.pt'}",
              "--llm_init=", "--beats_init=", "--asr_data_dir="],
             f"whisper_init={tmp_path / 'cut.pt'}"),
            ([sys.executable, "eval.py", str(good), f"--data_dir={other_data}"],
             f"vocab_size={meta['codebook_size']} in the checkpoint, 2048 from"),
            ([sys.executable, "eval.py", str(good), "--split=test"], "expected train or val"),
            ([sys.executable, "eval.py", str(good), f"--data_dir={no_field}"],
             f"data_dir {no_field}: its meta.json or clip lists lack the field 'n_mels'"),
            (train(new, no_field), "lack the field 'n_mels'"),
            *[(train(new, d), f"data_dir {d}: meta.json is not prepare.py's") for d in odd_meta],
            ([sys.executable, "eval.py", str(good), f"--data_dir={odd_meta[0]}"],
             f"data_dir {odd_meta[0]}: meta.json is not prepare.py's"),
            (train(new, synth_dir, "--kinds=speech,podcast"), "has no clip of kind podcast"),
            (train(new, other_codec, f"--init_from={good / 'ckpt.pt'}"),
             "its weights learned the codes of"),
            (train(new, empty_val), "val_codes.bin, val_mel.bin"),
            ([sys.executable, "eval.py", str(good), f"--data_dir={cut_codes}"],
             "train_codes.bin ("),
            ([sys.executable, "sample.py", f"--out_dir={good / 'ckpt.pt'}"],
             f"--out_dir={good / 'ckpt.pt'}: a file; --out_dir names a run's folder"),
            ([sys.executable, "sample.py", f"--out_dri={good}"],
             "--out_dri (did you mean --out_dir"),
            ([sys.executable, "sample.py", f"--out_dir={good}", "--clip=1",
              f"--audio={tmp_path / 'in.wav'}"],
             "the input is a clip of the data or a file, not both"),
            ([sys.executable, "sample.py", f"--out_dir={good}", "--temprature=0.5"],
             "--temprature (did you mean --temperature?)"),
            (train(new, synth_dir, "--n_embd=64", f"--init_from={good / 'ckpt.pt'}"),
             f"init_from={good / 'ckpt.pt'}: its weights do not fit this model (settings that "
             f"differ: n_embd=32 there, 64 here)"),
            # another head count fits every tensor, so it loaded, silently into another layout
            (train(new, synth_dir, "--n_head=4", f"--init_from={good / 'ckpt.pt'}"),
             f"init_from={good / 'ckpt.pt'}: another split of heads (n_head=2 there, 4 here) "
             f"would read its weights in another layout"),
            ([sys.executable, "eval.py", str(good), f"--json={tmp_path / 'none' / 'x.json'}"],
             "its folder does not exist"),
            ([sys.executable, "eval.py", str(good), f"--json={tmp_path}"],
             "a folder; name the file"),
            ([sys.executable, "sample.py", f"--out_dir={good}", "--prompt=hello"],
             "takes no text prompt"),
            ([sys.executable, "sample.py", f"--out_dir={good}", "--prompt=  "],
             "--prompt='  ': blank; leave it out for the model's default instruction"),
            ([sys.executable, "sample.py", f"--out_dir={good}", f"--data_dir={cut_codec}",
              "--max_new_tokens=2"], f"{cut_codec / codec_file}: cannot be read, it is truncated"),
            ([sys.executable, "sample.py", f"--out_dir={good}",
              f"--out={tmp_path / 'a_file' / 'sub' / 'x.wav'}"],
             f"{tmp_path / 'a_file'} is a file, not a folder"),
            ([sys.executable, "sample.py", f"--out_dir={good}", f"--out={tmp_path / 'x.mp3'}"],
             "audio is written as WAV"),
            (train(new, synth_dir, "--dropout=1.5"),
             "dropout (1.5) must be at least 0 and under 1"),
            (train(new, synth_dir, "--dtype=float64"),
             "train.py: dtype='float64': expected auto, float32, bfloat16 or float16"),
            ([sys.executable, "sample.py", f"--out_dir={good}", "--dtype=fp16"],
             "sample.py: dtype='fp16': expected auto, float32, bfloat16 or float16"),
            # too short for the hybrid's first 7 frames: the model's refusal names the input
            ([sys.executable, "sample.py", f"--out_dir={good}", f"--audio={tmp_path / 'short.wav'}",
              f"--out={tmp_path / 'short_out.wav'}"],
             f"the hybrid needs at least 7 (7 for the codec's stream decoder, more than mel_lag=1) "
             f"(input: --audio={tmp_path / 'short.wav'}, 0.04 s)"),
            ([sys.executable, "sample.py", f"--out_dir={good}", f"--data_dir={tmp_path / 'nope'}"],
             f"--data_dir={tmp_path / 'nope'}: no such folder"),
            ([sys.executable, "sample.py", f"--out_dir={good}", f"--out={tmp_path / 'no_dir'}"],
             f"no folder {tmp_path / 'no_dir'} exists: --out={tmp_path / 'no_dir'}{os.sep} makes"),
            # what is already there is not written over: the checkpoint, the input audio
            ([sys.executable, "eval.py", str(good), f"--json={good / 'ckpt.pt'}"],
             "the file exists and is not eval.py's results"),
            ([sys.executable, "eval.py", str(good), f"--json={tmp_path / 'meta.json'}"],
             "the file exists and is not eval.py's results"),
            ([sys.executable, "sample.py", f"--out_dir={good}", f"--audio={tmp_path / 'in.wav'}",
              f"--out={tmp_path / 'in.wav'}"], "would write over the input --audio"),
            ([sys.executable, "sample.py", f"--out_dir={good}", f"--audio={tmp_path / 'in.png'}",
              f"--out={tmp_path / 'in.wav'}"], "would write over the input --audio"))
    sound = np.sin(np.linspace(0, 2000, 24000)).astype(np.float32)
    import soundfile
    soundfile.write(tmp_path / "in.wav", sound, 24000)
    soundfile.write(tmp_path / "short.wav", sound[:1000], 24000)  # 4 frames
    shutil.copyfile(tmp_path / "in.wav", tmp_path / "in.png")  # audio under a picture's name
    (tmp_path / "meta.json").write_text('{"n_mels": 64}')      # JSON, but not eval.py's
    kept = {f: f.read_bytes() for f in (good / "ckpt.pt", tmp_path / "in.wav", tmp_path / "in.png",
                                        tmp_path / "meta.json")}
    checks += [(cmd, [words]) for cmd, words in cases]
    runs = run_scripts([cmd for cmd, _ in checks], cwd=ROOT, env=ENV, timeout=300)
    for (cmd, words), p in zip(checks, runs):
        assert (p.returncode == 2 and all(w in p.stderr for w in words)
                and "Traceback" not in p.stderr), (cmd, p.stderr)
    assert {f: f.read_bytes() for f in blobs} == blobs             # nothing wrote over them
    assert {f: f.read_bytes() for f in kept} == kept
    assert not new.exists()  # the runs that stopped on bad input left no empty out_dir behind

PREPARE = ["--clips=16", "--max_seconds=1.0", "--offline", "--codec_steps=4", "--codec_clips=8",
           "--codec_tune_steps=2", "--codec_report=0", "--kmeans_frames=2048", "--kmeans_iters=2",
           "--quiet"]

def test_prepare_stopped_by_ctrl_c_says_how_to_resume_in_one_line(tmp_path):
    """Ctrl-C (SIGINT) while prepare.py encodes: one line, not a traceback. Before the first chunk
    of clips (prepare.CHUNK) is saved it says nothing is kept (and leaves no folder: it said the
    clips were kept); once one is, that they are and how to resume."""
    import prepare
    out = tmp_path / "data"
    cmd = [sys.executable, "prepare.py", f"--clips={prepare.CHUNK + 40}", "--max_seconds=1.0",
           "--offline", "--codec_report=0", "--kmeans_frames=2048", "--kmeans_iters=2",
           f"--out_dir={out}"]
    # (while the offline codec trains, before any clip is encoded, its saved steps are what is kept)
    codec_cmd = cmd + ["--codec_steps=100000", "--codec_clips=4"]
    for saved in (False, True, "codec"):
        proc = subprocess.Popen(codec_cmd if saved == "codec" else cmd, cwd=ROOT, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                preexec_fn=sigint_as_usual)
        seen, t0 = b"", time.time()
        while time.time() - t0 < 300:
            if saved == "codec" and list(out.glob(".work-*/codec_train.pt")):
                break
            if b"encode:" in seen and (not saved or list(out.glob(".work-*/chunk00000.npz"))):
                break
            chunk = proc.stderr.read1(4096)
            if not chunk:
                break
            seen += chunk
        assert proc.poll() is None, seen.decode(errors="replace")  # still encoding
        proc.send_signal(signal.SIGINT)
        err = (seen + proc.communicate(timeout=120)[1]).decode(errors="replace")
        assert proc.returncode == 1 and "Traceback" not in err, err[-2000:]
        if saved == "codec":
            assert err.rstrip().endswith("interrupted before the first chunk of clips was encoded: "
                                         "the offline codec's training steps are kept; run the "
                                         "same command again to resume"), err[-500:]
        elif saved:
            assert err.rstrip().endswith("interrupted: the clips encoded so far are kept; run the "
                                         "same command again to resume (other arguments start "
                                         "anew)"), err[-500:]
            assert not (out / "meta.json").exists()
        else:
            assert err.rstrip().endswith("interrupted before the first chunk of clips was "
                                         "encoded: nothing is kept"), err[-500:]
            assert not out.exists()
    # after --force, the same command would start anew: the line says to leave it out
    assert prepare.interrupted_message(cmd[2:] + ["--force"]).endswith(
        "run the same command without --force again to resume (other arguments start anew)")
    assert "without" not in prepare.interrupted_message(cmd[2:])

def interrupted(cmd, marker, settle=0.0):
    """Run cmd until its output holds marker (and settle seconds more), send it SIGINT alone, and
    check that it ends with code 1 and no traceback; its last line."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, preexec_fn=sigint_as_usual)
    seen, t0 = b"", time.time()
    while marker not in seen and time.time() - t0 < 300:
        chunk = proc.stdout.read1(4096)
        if not chunk:
            break
        seen += chunk
    time.sleep(settle)
    assert proc.poll() is None, seen.decode(errors="replace")  # still at work
    proc.send_signal(signal.SIGINT)
    out = (seen + proc.communicate(timeout=120)[0]).decode(errors="replace")
    assert proc.returncode == 1 and "Traceback" not in out, out[-2000:]
    return out.rstrip().splitlines()[-1]

def test_sample_stopped_by_ctrl_c_while_torch_imports_says_so_in_one_line(tmp_path):
    """Ctrl-C in sample.py's first second or two, while torch imports (after numpy: -X importtime
    says when numpy is done): its one line, not a KeyboardInterrupt's traceback."""
    last = interrupted([sys.executable, "-X", "importtime", "sample.py",
                        f"--out_dir={tmp_path}"], b"| numpy\n")
    assert last.endswith("sample.py: interrupted; nothing written"), last

def test_train_sample_and_eval_stopped_by_ctrl_c_say_so_in_one_line(synth_dir, tmp_path):
    """Ctrl-C (SIGINT) in train.py's loop: a line naming the iteration and the checkpoint kept,
    which loads (before the loop, while the data loads: a line saying so); in sample.py's
    generation and eval.py's evaluations: a line saying nothing was written, and nothing is. None
    prints a traceback."""
    # while the data loads and the model is built (~1-2 s after the run's first line)
    early = tmp_path / "early"
    last = interrupted(train(early, synth_dir, "--max_iters=100000"), b"iterations into")
    assert last == ("train.py: interrupted before the first iteration; no checkpoint was saved "
                    "yet"), last
    assert not (early / "ckpt.pt").exists()
    run = tmp_path / "run"
    last = interrupted(train(run, synth_dir, "--max_iters=100000"), b"saved ")
    assert re.fullmatch(rf"train\.py: interrupted at iter \d+; {re.escape(str(run / 'ckpt.pt'))}, "
                        r"its last save, is kept: the same command resumes it", last), last
    from train import load_checkpoint
    assert load_checkpoint(run / "ckpt.pt")["iter_num"] % 2 == 0
    # a run that would overwrite it, stopped while it loads: the old run's checkpoint is untouched
    last = interrupted(train(run, synth_dir, "--max_iters=100000", "--overwrite=True"),
                       b"iterations into")
    assert last.endswith(f"{run / 'ckpt.pt'}, the old run's, is untouched (nothing was "
                         f"overwritten yet)"), last
    # one that overwrote it: the same command would start anew, so the line says so
    last = interrupted(train(run, synth_dir, "--max_iters=100000", "--overwrite=True"), b"saved ")
    assert last.endswith("its last save, is kept: the same command without overwrite=True "
                         "resumes it"), last
    wav = tmp_path / "s.wav"
    last = interrupted([sys.executable, "sample.py", f"--out_dir={run}", f"--data_dir={synth_dir}",
                        "--max_new_tokens=9000", f"--out={wav}"], b"generate")
    assert last.endswith("sample.py: interrupted; nothing written"), last
    assert not wav.exists() and not wav.with_suffix(".png").exists()
    # eval.py, in the second of two evaluations (the run and a copy): nothing written either
    results = tmp_path / "results.json"
    shutil.copytree(run, tmp_path / "copy")
    last = interrupted([sys.executable, "eval.py", str(run), str(tmp_path / "copy"),
                        f"--data_dir={synth_dir}", f"--json={results}"], b"[2/2]")
    assert last.endswith("eval.py: interrupted; nothing written"), last
    assert not results.exists()

def test_eval_keeps_the_rows_of_the_runs_done_when_a_later_one_stops(synth_dir, tmp_path):
    """eval.py over two runs, the second's data gone: it stops on that run with one line that
    names it, after printing the first run's row, not losing it."""
    good = tmp_path / "good"
    p = run_script(train(good, synth_dir, "--max_iters=2"), cwd=ROOT, env=ENV,
                   timeout=300)
    assert p.returncode == 0, p.stderr
    moved = tmp_path / "moved"
    moved.mkdir()
    ck = torch.load(good / "ckpt.pt", weights_only=True)
    ck["config"]["data_dir"] = str(tmp_path / "gone")
    torch.save(ck, moved / "ckpt.pt")
    p = run_script([sys.executable, "eval.py", str(good), str(moved)], cwd=ROOT,
                   env=ENV, timeout=300)
    assert p.returncode == 2 and f"{moved / 'ckpt.pt'}: data:" in p.stderr, p.stderr[-2000:]
    assert "the table above holds the 1 run(s) evaluated before" in p.stderr, p.stderr[-2000:]
    rows = [line for line in p.stdout.splitlines() if line.startswith("| ")]
    assert len(rows) == 2 and rows[1].startswith("| good |"), p.stdout  # header, the run
    assert "Traceback" not in p.stderr

def test_eval_refuses_a_json_path_ending_in_a_slash_before_evaluating(synth_dir, tmp_path):
    """--json=new_folder/ (or a file's name with a trailing /) names no file to write: refused
    before any evaluation, as an existing folder is, not after the evaluations."""
    good = tmp_path / "good"
    p = run_script(train(good, synth_dir, "--max_iters=2"), cwd=ROOT, env=ENV, timeout=300)
    assert p.returncode == 0, p.stderr
    (tmp_path / "r.json").write_text("[]")
    for path in (f"{tmp_path / 'new'}{os.sep}", f"{tmp_path / 'r.json'}{os.sep}"):
        p = run_script([sys.executable, "eval.py", str(good), f"--json={path}"], cwd=ROOT,
                       env=ENV, timeout=300)
        assert (p.returncode == 2 and f"--json={path}: a folder; name the file to write"
                in p.stderr and "Traceback" not in p.stderr), p.stderr[-2000:]
        assert "| run |" not in p.stdout, p.stdout  # refused before the evaluation
    assert not (tmp_path / "new").exists() and (tmp_path / "r.json").read_text() == "[]"

def killed_at(cmd, marker, timeout=300):
    """Runs cmd until its output (stdout and stderr, progress bars included) shows marker, then
    kills it with SIGKILL. Returns whether the kill landed (False: it finished first) and the output
    seen."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    seen, t0 = b"", time.time()
    while marker.encode() not in seen and time.time() - t0 < timeout:
        chunk = proc.stdout.read1(4096)
        if not chunk:  # the run ended
            break
        seen += chunk
    landed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    return landed and marker.encode() in seen, seen.decode(errors="replace")

def test_prepare_killed_in_each_phase_then_rerun_writes_the_same_bytes(tmp_path):
    """prepare.py killed with SIGKILL as each phase starts (codec training, encoding, k-means, the
    tokenizer and the writing after it), each run resuming the one before, then run again to the
    end: every output file is byte-identical to an uninterrupted run's."""
    out = tmp_path / "data"
    cmd = [sys.executable, "prepare.py", *PREPARE, f"--out_dir={out}"]
    p = run_script(cmd, cwd=ROOT, env=ENV, timeout=600)
    assert p.returncode == 0, p.stderr
    ref = tmp_path / "ref"
    shutil.move(out, ref)
    loud = [a for a in cmd if a != "--quiet"]  # the progress lines mark the phases
    for marker in ("train codec:", "encode:", "fit codebooks:", "tokenizer:"):
        landed, seen = killed_at(loud, marker)
        # the writing after "tokenizer:" takes milliseconds: that run may end before its kill lands,
        # and the run after it then finds the data finished
        assert landed or marker == "tokenizer:", marker
    # each run took up the last one's work, not just redid it (which would write the same bytes):
    # the one killed at "tokenizer:" found every clip encoded by the one before
    assert "resuming: 16 clips already encoded" in seen, seen[-2000:]
    # finished with progress shown, the reference without: how a run is watched is not in its data
    p = run_script(loud, cwd=ROOT, env=ENV, timeout=600)
    assert p.returncode == 0, p.stderr
    names = sorted(f.name for f in ref.iterdir())
    assert sorted(f.name for f in out.iterdir() if not f.name.startswith(".")) == names
    for name in names:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name

def test_settings_that_are_no_literal_and_devices_this_machine_lacks(monkeypatch, capsys):
    """A --key=value that Python cannot evaluate as a literal ({[1]: 2} raises TypeError) is read as
    text and then named; a GPU index past the machine's count is named before any work."""
    import configurator
    import train
    assert configurator.literal("{[1]: 2}") == "{[1]: 2}"
    with pytest.raises(SystemExit):
        train.load_settings(["--learning_rate={[1]: 2}"])
    assert "learning_rate" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert configurator.resolve_device("train.py", "cuda:0") == "cuda:0"
    for past in ("cuda:7", "cuda:1"):  # cuda:1 is the second GPU, which this one lacks
        with pytest.raises(SystemExit):
            configurator.resolve_device("train.py", past)
        assert "has 1 GPU(s), cuda:0 to cuda:0" in capsys.readouterr().err

def test_auto_dtype_is_float16_on_a_gpu_that_only_emulates_bfloat16(monkeypatch):
    """--dtype=auto: bfloat16 from sm_80 on, float16 on an older GPU (a T4 is sm_75). Such a GPU
    creates bfloat16 tensors, so torch.cuda.is_bf16_supported() says yes (emulation); that answer
    gave it slow bf16 matmuls and no GradScaler. The GPU is faked: no CUDA needed."""
    import types
    import configurator
    capability = [(7, 5)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None:
                        types.SimpleNamespace(major=capability[0][0], minor=capability[0][1]))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)
    assert configurator.resolve_dtype("train.py", "auto", "cuda") == "float16"
    assert configurator.resolve_dtype("train.py", "bfloat16", "cuda") == "bfloat16"  # as asked
    capability[0] = (8, 0)  # an A100: sm_80 is the first with bfloat16 in hardware
    assert configurator.resolve_dtype("train.py", "auto", "cuda") == "bfloat16"
    capability[0] = (9, 0)
    assert configurator.resolve_dtype("train.py", "auto", "cuda") == "bfloat16"
    assert configurator.resolve_dtype("train.py", "auto", "cpu") == "float32"

def test_a_safetensors_file_cut_short_or_corrupt_is_named_not_a_traceback(tmp_path):
    """read_safetensors (salmonn.py, and pengi.py's copy) on a file safetensors itself wrote reads
    the tensors back; cut short, emptied, filled with garbage (whose first 8 bytes read as a header
    of exabytes, once a MemoryError), or with a header that is not JSON, it raises a ValueError that
    names the file."""
    import pengi
    import salmonn
    from safetensors.torch import save_file
    tensors = {"wte.weight": torch.randn(5, 3), "h.0.ln_1.bias": torch.arange(4.0).half()}
    good = tmp_path / "model.safetensors"
    save_file(tensors, str(good))
    raw = good.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    bad = {"cut": raw[:len(raw) - 6], "empty": b"", "garbage": bytes(range(7, 250)) * 40,
           "header": raw[:8] + b"{" * n + raw[8 + n:],
           "field": raw.replace(b'"dtype"', b'"dtypf"', 1)}  # JSON, a field misnamed
    for read in (salmonn.read_safetensors, pengi.read_safetensors):
        got = read(str(good))
        assert got.keys() == tensors.keys() and all(torch.equal(got[k], v)
                                                   for k, v in tensors.items())
        for name, data in bad.items():
            path = tmp_path / f"{name}.safetensors"
            path.write_bytes(data)
            try:
                read(str(path))
            except ValueError as e:
                assert str(path) in str(e) and "truncated or corrupt" in str(e), (name, e)
            else:
                raise AssertionError(f"{name}: read without an error")

def test_pretrained_files_that_hold_no_checkpoint_are_named(tmp_path):
    """whisper_init, beats_init and llm_init (salmonn.py, and pengi.py's llm_init) given a file
    torch reads but that holds no checkpoint (a bare tensor, a list), or one of ours whose
    model_args lack the sizes, raise a ValueError naming the setting and the file, not torch's or
    Python's own error."""
    import pengi
    import salmonn
    tensor, listed = tmp_path / "tensor.pt", tmp_path / "list.pt"
    torch.save(torch.zeros(3), tensor)
    torch.save([1, 2], listed)
    no_sizes = tmp_path / "no_sizes.pt"  # ours, model_args emptied
    torch.save({"model": {"speech.w": torch.zeros(1), "beats.w": torch.zeros(1)},
                "model_args": {}}, no_sizes)
    loaders = ((salmonn.load_whisper_encoder_state, "whisper_init"),
               (salmonn.load_beats_state, "beats_init"),
               (salmonn.load_llm_state, "llm_init"), (pengi.load_llm_state, "llm_init"))
    for load, field in loaders:
        for path, said in ((tensor, "holds a Tensor"), (listed, "holds a list")):
            with pytest.raises(ValueError, match=f"{field}={path}: {said}"):
                load(str(path))
    for load, field in loaders[:2]:
        with pytest.raises(ValueError, match=f"{field}={no_sizes}: its model_args lack"):
            load(str(no_sizes))

def test_sample_writes_a_file_whole_or_leaves_the_old_one(tmp_path):
    """sample.py's outputs go through a .tmp renamed over the file (configurator.written_whole, as
    every script's): a write that fails midway (a full disk) leaves the old file as it was and no
    part beside it (which would keep a disk full)."""
    import configurator
    import sample
    path = str(tmp_path / "answer.txt")
    sample.write_text(path, "old")
    with pytest.raises(OSError):
        with configurator.written_whole(path) as tmp:
            with open(tmp, "w") as f:
                f.write("a part")
            raise OSError(28, "No space left on device")
    assert os.listdir(tmp_path) == ["answer.txt"] and open(path).read() == "old\n"
    sample.write_wav(str(tmp_path / "a.wav"), np.zeros(240), 24000)
    sample.write_text(path, "new")
    assert sorted(os.listdir(tmp_path)) == ["a.wav", "answer.txt"] and open(path).read() == "new\n"

def test_written_whole_writes_beside_its_file_and_cleans_up_after_ctrl_c(tmp_path):
    """written_whole's part is path + ".tmp", in the file's own folder (a rename within one file
    system is atomic; from another, such as /tmp, it is a copy or fails), and a Ctrl-C while
    writing (KeyboardInterrupt, no Exception) also leaves the old file and no part beside it."""
    import configurator
    path = str(tmp_path / "report.md")
    with configurator.written_whole(path) as tmp:
        assert tmp == path + ".tmp"
        with open(tmp, "w") as f:
            f.write("old")
    with pytest.raises(KeyboardInterrupt):
        with configurator.written_whole(path) as tmp:
            with open(tmp, "w") as f:
                f.write("a part")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["report.md"] and open(path).read() == "old"

def test_table_and_bench_stopped_by_ctrl_c_say_so_in_one_line(synth_dir, tmp_path):
    """whisper_gpt_table.py sent SIGINT alone (its train.py runs not signalled, as with `kill -INT`)
    stops them too and says in one line that the runs are kept; bench_whisper_gpt.py says nothing
    was written. Neither prints a traceback."""
    runs = tmp_path / "runs"
    table = [sys.executable, "whisper_gpt_table.py", "--models=s", "--kinds=speech", "--seeds=1",
             f"--data_dir={synth_dir}", f"--out_root={runs}", "--max_iters=100000",
             "--eval_interval=1000", "--eval_iters=1", "--batch_size=2", "--block_size=16",
             "--log_interval=1"]
    last = interrupted(table, b"  start ", settle=1.0)
    assert last == ("whisper_gpt_table.py: interrupted; the runs in --out_root are kept, each at "
                    "its last checkpoint: the same command goes on from there"), last
    # no train.py of the sweep is left running: none names its out_root
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
        except OSError:
            continue
        if str(runs) in cmdline and "train.py" in cmdline:
            left.append(cmdline)
    assert not left, left
    bench = [sys.executable, "bench_whisper_gpt.py", "--part=generate", f"--data_dir={synth_dir}",
             "--new_tokens=1000", "--repeats=1"]
    # stopped after its first row, in recomputation (~10x slower)
    last = interrupted(bench, b"| GPT-S | KV cache", settle=1.0)
    assert last == "bench_whisper_gpt.py: interrupted; nothing was written", last

def test_bench_attention_stopped_by_ctrl_c_says_so_in_one_line(tmp_path):
    """bench_attention.py --ptxas (minutes, on a CPU) stopped by Ctrl-C: one line, no traceback
    (it printed Triton's compiler stack), and no --out file."""
    out = tmp_path / "builds.md"
    # an empty Triton cache: the builds take seconds each, so the run is still at work
    cmd = ["env", f"TRITON_CACHE_DIR={tmp_path / 'cache'}", sys.executable, "bench_attention.py",
           "--ptxas", "--tiles=default", "--dims=16", f"--out={out}"]
    last = interrupted(cmd, b"| fwd | 16 |", settle=0.5)
    assert last == "bench_attention.py: interrupted; nothing was written", last
    assert not out.exists()

def test_a_mistyped_fused_attention_variable_stops_each_script_in_one_line(synth_dir, tmp_path):
    """fused_attention checks its FUSED_ATTENTION* variables as it is imported, with the model file:
    train.py, sample.py and eval.py each stop in one line naming the variable (it was a traceback
    for train.py and sample.py)."""
    out = tmp_path / "run"
    assert run_script(train(out, synth_dir, "--max_iters=1"), cwd=ROOT, env=ENV,
                      timeout=300).returncode == 0
    env = {**ENV, "FUSED_ATTENTION_BWD": "atomics"}
    cmds = [train(tmp_path / "run2", synth_dir),
            [sys.executable, "sample.py", f"--out_dir={out}", f"--out={tmp_path / 's.wav'}"],
            [sys.executable, "eval.py", str(out)]]
    for cmd, p in zip(cmds, run_scripts(cmds, cwd=ROOT, env=env, timeout=300)):
        said = (f"{os.path.basename(cmd[1])}: fused_attention: FUSED_ATTENTION_BWD must be auto, "
                f"atomic or split, got 'atomics' (fused_attention.BWD)")
        assert p.returncode == 2 and p.stderr.strip() == said, (cmd[1], p.stderr[-2000:])

def test_help_under_a_mistyped_fused_attention_variable_is_one_line_not_a_traceback():
    """--help imports the model files to list their options (train.py: the model's Config), and
    fused_attention now checks FUSED_ATTENTION as it is imported: the help's settings are printed,
    then one line naming the variable (it was a traceback; before the import-time check,
    FUSED_ATTENTION=Torch printed the whole help)."""
    env = {**ENV, "FUSED_ATTENTION": "Torch"}
    cmds = [[sys.executable, script, "--help"] for script in ("sample.py", "eval.py", "train.py")]
    for cmd, p in zip(cmds, run_scripts(cmds, cwd=ROOT, env=env, timeout=300)):
        said = (f"{cmd[1]}: fused_attention: backend (or env FUSED_ATTENTION) must be auto, triton "
                f"or torch, got 'Torch'")
        assert "Traceback" not in p.stderr and p.stderr.strip() == said, (cmd[1], p.stderr[-2000:])
        assert "Settings, as --key=value" in p.stdout, (cmd[1], p.stdout[-2000:])
