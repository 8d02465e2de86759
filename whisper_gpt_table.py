"""
Whisper-GPT's Table 1 at CPU size. Four models: GPT-S, the hybrid of the same size, GPT-L (~10x),
and the hybrid trained on the mels of its codebook 0 decoded alone (hybrid_c0). Each is trained on
the speech clips and on the music clips of the built-in corpus, several seeds each. Out comes one
markdown table:
  - next-coarse-token NLL / accuracy / perplexity (mean +- std over seeds) beside the paper's rows;
  - the paper's claims, checked seed by seed;
  - continuations of held-out clips by GPT-S and the hybrids (wavs, pictures, and their scores
    beside the true continuation's).
A re-run skips finished runs. It also reuses their evaluations and continuations' scores
(eval-*.json, cont-*.json in each run) while checkpoint, data and code are unchanged (and, for
continuations, the clips and frame counts).

    python whisper_gpt_table.py                          # the sweep (resumable) and the table
    python whisper_gpt_table.py --max_iters=20 --seeds=1 --out_root=out/t --out=t.md   # a quick try

Any --key=value not among the settings below goes to train.py, for every run (e.g. --max_iters=300).
"""

import ast
import contextlib
import functools
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import torch

import configurator

# -----------------------------------------------------------------------------
models = "s,hybrid,l,hybrid_c0"  # config/whisper_gpt_{name}_cpu.py
kinds = "speech,music"         # stand-ins for the paper's two datasets, LibriSpeech and music
seeds = "1337,1,2"
jobs = 2                       # runs side by side, one thread each
data_dir = "data/synth"
# a held-out corpus of data_dir's codec (prepare.py --codec_from), e.g. data/synth_test_wg: the
# runs are scored and tabled on it too
test_dir = ""
out_root = "out/table1"        # runs go to out_root/{model}-{kind}-s{seed}
# the markdown file; default {out_root}/table1.md (docs/whisper_gpt_table1.md only when named)
out = ""
# held-out clips per kind (of test_dir if given) continued by GPT-S and the hybrids of the first
# seed; 0 = none
continuations = 48
prompt_frames = 60             # 0.8 s of prompt ...
new_frames = 60                # ... then 0.8 s of continuation, compared with the true next 0.8 s
# -----------------------------------------------------------------------------

TITLE = "# Whisper-GPT, Table 1 at CPU size"  # the first line of the --out file
NAMES = {"s": "GPT-S", "hybrid": "Hybrid", "l": "GPT-L", "hybrid_c0": "Hybrid on codebook-0 mels"}
PAPER = [  # Verma 2024, Table 1: NLL (nats/token), accuracy (%), PPL
    ("LibriSpeech", "GPT-S", "3.7M", 2.02, 34.18, 7.54),
    ("LibriSpeech", "GPT-L", "40M", 1.94, 34.82, 6.96),
    ("LibriSpeech", "Hybrid", "4M", 1.93, 35.05, 6.96),
    ("music", "GPT-S", "3.7M", 2.78, 34.96, 16.12),
    ("music", "GPT-L", "40M", 2.77, 35.72, 15.96), ("music", "Hybrid", "4M", 2.52, 38.47, 12.43)]

def fail(msg):
    configurator.fail("whisper_gpt_table.py", msg)

# the sweep's train.py runs going on, (out_dir, process, log, start): a stop stops them too
running = []

def interrupted(signum, frame):
    """Ctrl-C (or a SIGINT to this process alone): its runs stopped with it, and one line."""
    procs = [proc for _, proc, _, _ in running]
    for proc in procs:  # as Ctrl-C would: train.py's own handler ends its save, one line
        proc.send_signal(signal.SIGINT)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(f"\nwhisper_gpt_table.py: interrupted; the runs in --out_root are kept, each at its "
          f"last checkpoint: the same command goes on from there", file=sys.stderr)
    sys.exit(1)

def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"

def progress(i, n, t0):
    """Where a loop over n like items, started at t0, is after i: "i/n, elapsed, ETA"."""
    took = time.time() - t0
    return f"{i}/{n}, {fmt_time(took)}, ETA ~{fmt_time(took / i * (n - i))}"

def write_json(path, obj, indent=None):
    with configurator.written_whole(path) as tmp, open(tmp, "w") as f:  # no half file, ever
        json.dump(obj, f, indent=indent)

def read_kept(path):
    """What an earlier call kept at path, or None (nothing there, or a file cut short)."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError:
        return None

# -----------------------------------------------------------------------------
# the sweep: one train.py process per (model, kind, seed), `jobs` at a time, each on one thread

def run_dir(model, kind, seed):
    return os.path.join(out_root, f"{model}-{kind}-s{seed}")

def model_of(path):
    return os.path.basename(path).split("-")[0]

def run_args(model, kind, seed, train_args):
    """train.py's arguments for one run, its --out_dir left out (the table's footer shows them)."""
    return [f"config/whisper_gpt_{model}_cpu.py", f"--data_dir={data_dir}", f"--kinds={kind}",
            f"--seed={seed}", "--device=cpu", *train_args, "--always_save_checkpoint=True"]

def checkpoint_state(d):
    """The iteration run d's checkpoint ended at, and its settings. None if there is no checkpoint,
    or one train.py cannot read (train.py says so when the run starts)."""
    from train import load_checkpoint
    try:
        ck = load_checkpoint(os.path.join(d, "ckpt.pt"), mmap=True)  # its settings only
    except ValueError:
        return None
    return ck.get("end_iter", ck["iter_num"]), ck["config"]  # end_iter: train.py's best-only mode

def read_wall(d):
    """Seconds spent training run d so far (wall.json), 0 if none."""
    path = os.path.join(d, "wall.json")
    if not os.path.isfile(path):
        return 0.0
    try:
        with open(path) as f:
            return float(json.load(f)["seconds"])
    except (ValueError, KeyError, TypeError) as e:  # the table writes it whole: hand-edited
        fail(f"{path}: not the sweep's record of the run's wall time ({type(e).__name__}: {e}); "
             f"delete it to count that run's time from now")

def last_iter(d):
    """The last "iter i/N | ... | eta ..." line of run d's train.log, as "iter i/N, eta ...".
    None before the first iteration is logged."""
    try:
        with open(os.path.join(d, "train.log"), "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))  # the tail: a long run's log is long
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith("iter "):
            parts = line.split(" | ")
            return f"{parts[0]}, {parts[-1]}" if parts[-1].startswith("eta ") else parts[0]
    return None

def sweep(runs, train_args):
    """Train every run not yet finished. A run that reached its max_iters (its config's, or
    train_args') is skipped; one that stopped earlier is resumed to it. A run made with other
    settings (other data, another learning rate, ...) or for more iterations stops the sweep: its
    figures would be tabled as these. So does one for fewer iterations where the learning rate
    decays until max_iters (decay_lr, lr_decay_iters 0, the configs' schedule): a shorter run cannot
    be continued into a longer one's schedule."""
    import train
    todo = []
    for model, kind, seed in runs:
        d = run_dir(model, kind, seed)
        args = [*run_args(model, kind, seed, train_args), f"--out_dir={d}"]
        state = checkpoint_state(d)
        if state:
            at, saved = state
            want = train.load_settings(args)[0]
            changed = train.changed_settings(want, saved, skip=("max_iters",))
            if changed:
                fail(f"{d}: a run with other settings ("
                     + train.describe_changes(changed, want, saved)
                     + "): give another --out_root, or delete it")
            if at >= saved["max_iters"] and saved["max_iters"] == want["max_iters"]:
                continue
            if saved["max_iters"] > want["max_iters"]:
                fail(f"{d}: a run to {saved['max_iters']} iterations (now at {at}), "
                     f"more than max_iters={want['max_iters']}: give another --out_root, or "
                     f"--max_iters={saved['max_iters']}")
            schedule_of_max_iters = want["decay_lr"] and not want["lr_decay_iters"]
            if saved["max_iters"] < want["max_iters"] and schedule_of_max_iters:
                fail(f"{d}: a run to {saved['max_iters']} iterations (now at {at}), fewer than "
                     f"max_iters={want['max_iters']}; a run of {want['max_iters']} decays its "
                     f"learning rate over all of them, so this one cannot become it: give "
                     f"another --out_root, or delete it")
        cmd = [sys.executable, "train.py", *args]
        if state:
            cmd.append("--init_from=resume")  # an interrupted sweep goes on where each run stopped
        todo.append((d, cmd))
    # the big model first: the sweep ends sooner
    todo.sort(key=lambda item: model_of(item[0]) != "l")
    print(f"sweep: {len(runs) - len(todo)} of {len(runs)} runs already finished, {len(todo)} to "
          f"train, {jobs} at a time")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done, took = 0, {m: [] for m in NAMES}
    last_status = time.time()
    while todo or running:
        while todo and len(running) < jobs:
            d, cmd = todo.pop(0)
            os.makedirs(d, exist_ok=True)
            log = open(os.path.join(d, "train.log"), "a")
            # wall time over all the sweeps that trained this run (an interrupted one's included)
            start = time.time() - read_wall(d)
            running.append((d, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env),
                            log, start))
            print(f"  start {d}")
        time.sleep(0.5)  # a run's wall time is known to this much
        # a GPT-L run takes minutes: where each running one is, once a minute
        if time.time() - last_status >= 60:
            last_status = time.time()
            print("  running " + "; ".join(
                f"{os.path.basename(d)} {fmt_time(time.time() - start)}: "
                f"{last_iter(d) or 'no iteration logged yet'}" for d, _, _, start in running))
        for item in list(running):
            d, proc, log, start = item
            write_json(os.path.join(d, "wall.json"), {"seconds": time.time() - start})
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            if proc.returncode:
                for _, other, _, _ in running:  # no run left behind without its sweep
                    other.terminate()
                fail(f"{d}: train.py exited with {proc.returncode}; see {d}/train.log")
            done += 1
            left = [d for d, *_ in running] + [d for d, _ in todo]
            took[model_of(d)].append(time.time() - start)
            # a model not finished yet: the mean of those that are
            guess = np.mean(sum(took.values(), []))
            eta = sum(np.mean(took[model_of(x)]) if took[model_of(x)] else guess
                      for x in left) / jobs
            print(f"  done  {d} in {fmt_time(time.time() - start)} ({done} done, {len(left)} left, "
                  f"ETA ~{fmt_time(eta)})")

# -----------------------------------------------------------------------------
# evaluation and the table

def load_run(d):
    """The trained Whisper-GPT of the run in directory d, in eval mode, and its checkpoint."""
    import whisper_gpt as W
    from train import load_checkpoint, load_weights
    path = os.path.join(d, "ckpt.pt")
    try:
        ck = load_checkpoint(path)
        net = W.Model(W.Config(**ck["model_args"]))
        load_weights(net, ck["model"], ck["model_args"], "the checkpoint's model_args")
    except ValueError as e:  # a checkpoint whose weights do not fit its own model, ...
        fail(e if str(e).startswith(path) else f"{path}: {e}")
    return net.eval(), ck

@functools.lru_cache(maxsize=None)
def code_digest(path):
    """md5 of a Python file's code with its comments and docstrings left out, so that editing
    those does not redo the evaluations (read once per call of the script)."""
    with open(path) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.md5(ast.dump(tree).encode()).hexdigest()

@functools.lru_cache(maxsize=None)
def file_digest(path):
    """md5 of a file, read once per call of the script (every run's key reads the same files)."""
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()

def evaluation_key(d, eval_dir):
    """What a run's evaluation depends on, hashed. That is its checkpoint file, the data it is
    scored on (where, prepared how, and the codebook-0 mels), and the code that scores it (the
    model file, its attention, the data contract, this script). A re-run of the table reuses an
    evaluation while all of these are unchanged."""
    here = os.path.dirname(os.path.abspath(__file__))
    ckpt, c0 = os.stat(os.path.join(d, "ckpt.pt")), os.path.join(eval_dir, "val_mel_c0.bin")
    key = [[ckpt.st_size, ckpt.st_mtime_ns], os.path.abspath(eval_dir),
           file_digest(c0) if os.path.exists(c0) else None,
           file_digest(os.path.join(eval_dir, "meta.json"))]
    key += [code_digest(os.path.join(here, f)) for f in ("whisper_gpt.py", "fused_attention.py",
                                                         "audio.py", "whisper_gpt_table.py")]
    return hashlib.md5(json.dumps(key).encode()).hexdigest()[:12]

def evaluate_run(d, eval_dir):
    """Table 1's metrics of a run on its kind's val clips in eval_dir, and whether they were kept
    from an earlier call. A hybrid trained on the real audio's mels is scored a second time
    ("as_generating"), on the mels of its codebook 0 decoded alone: what it sees of its own output
    while generating."""
    import whisper_gpt as W
    path = os.path.join(d, f"eval-{evaluation_key(d, eval_dir)}.json")
    kept = read_kept(path)
    if kept is not None:
        return {**kept, "wall": read_wall(d) or None}, True
    model, ck = load_run(d)
    config = model.config
    result = W.evaluate(model, W.load_data(eval_dir, config), None, "val")
    if config.use_mel and config.mel_source == "audio":
        config.mel_source = "codebook0"
        result["as_generating"] = W.evaluate(model, W.load_data(eval_dir, config), None, "val")
    result = {**result, "params": model.get_num_params(), "iters": ck["iter_num"]}
    write_json(path, result)
    return {**result, "wall": read_wall(d) or None}, False

def mean_std(values):
    """The mean and the sample standard deviation (None for one value: no spread is known)."""
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)

def pm(m, sd, digits=3, scale=1, sign=False, unit=""):
    """"m +- sd", each times scale, to digits decimals, then unit; m alone when the spread is not
    known (one value)."""
    mean = f"{m * scale:{'+' if sign else ''}.{digits}f}"
    return mean + unit if sd is None else f"{mean} +- {sd * scale:.{digits}f}{unit}"

def metric_cells(rs):
    """The NLL, accuracy and PPL cells of the results rs: mean +- std over them."""
    (n, dn), (a, da), (p, dp) = (mean_std([r[k] for r in rs]) for k in ("nll", "accuracy", "ppl"))
    return f"{pm(n, dn)} | {pm(a, da, 2, 100, unit='%')} | {pm(p, dp, 2)}"

def table(results, model_list, kind_list, seed_list, train_args, eval_dir):
    """Markdown lines: the paper's rows, ours (mean +- std over seeds), then the claims."""
    lines = ["| data | model | params | NLL (nats/token) | accuracy | PPL | runs |",
             "|---|---|---|---|---|---|---|"]
    for kind, model, params, nll, acc, ppl in PAPER:
        lines.append(f"| paper, {kind} | {model} | {params} | {nll:.2f} | {acc:.2f}% | {ppl:.2f} | "
                     f"|")
    for kind in kind_list:
        for model in model_list:
            rs = [results[(model, kind, s)] for s in seed_list]
            walls = [r["wall"] for r in rs if r["wall"]]
            lines.append(f"| ours, {kind} | {NAMES[model]} CPU | {rs[0]['params'] / 1e6:.2f}M | "
                         f"{metric_cells(rs)} | {len(rs)} seed{'s' * (len(rs) > 1)}, "
                         f"{rs[0]['iters']} it."
                         + (f", {fmt_time(np.mean(walls))} each" if walls else "") + " |")
            if model == "hybrid" and "as_generating" in rs[0]:
                generating = metric_cells([r["as_generating"] for r in rs])
                lines.append(f"| ours, {kind} | Hybrid CPU, given the mels of its codebook 0 (as "
                             f"when generating) | | {generating} | the same runs |")
    lines.append("")
    # the paper's two claims, paired by seed (same data order and init seed for both models)
    for kind in kind_list:
        for hybrid, other, claim in (("hybrid", "s", "the hybrid beats GPT-S of its size"),
                                     ("hybrid", "l", "the hybrid matches GPT-L (~10x larger)"),
                                     ("hybrid_c0", "s",
                                      "the hybrid trained on codebook-0 mels beats GPT-S")):
            if hybrid not in model_list or other not in model_list:
                continue
            d = [results[(hybrid, kind, s)]["nll"] - results[(other, kind, s)]["nll"]
                 for s in seed_list]
            m, sd = mean_std(d)
            wins = sum(x < 0 for x in d)
            lines.append(f"- {kind}: {claim}? NLL {NAMES[hybrid]} - {NAMES[other]} = "
                         f"{pm(m, sd, sign=True)} (lower in {wins} of {len(d)} "
                         f"seed{'s' * (len(d) > 1)})")
    lines.append("")
    lines.append(f"(val clips of each kind from {eval_dir}; train.py settings: "
                 + " ".join(run_args("{model}", "{kind}", "{seed}", train_args)) + ")")
    return lines

# -----------------------------------------------------------------------------
# continuations: a held-out clip's first prompt_frames as prompt, then new_frames generated and
# compared with the clip's true next frames. Both are decoded from codebook 0 alone, so the codec's
# own error cancels.

def continuation_scores(true_mel, mel):
    """Three scores of a continuation's log-mel, after the prompt:
      - its L1 distance to the true one, frame by frame;
      - the same on the time-averaged spectrum (timbre, pitch, loudness, whatever the timing);
      - its level modulation: the std over time of each frame's mean log-mel (syllables and notes
        move it; a held sound does not)."""
    need = prompt_frames + new_frames
    true, gen = true_mel[prompt_frames:need], mel[prompt_frames:need]
    return (float(np.abs(gen - true).mean()),
            float(np.abs(gen.mean(0) - true.mean(0)).mean()), float(gen.mean(1).std()))

def looped_prompt_end(mel):
    """The prompt, then its last min(prompt_frames, new_frames) frames looped. With the defaults
    (60 and 60) the whole prompt plays again."""
    end = mel[prompt_frames - min(prompt_frames, new_frames):prompt_frames]
    return np.concatenate([mel[:prompt_frames], np.resize(end, (new_frames, mel.shape[1]))])

def reference_scores(mels, idx):
    """Scores of the true continuations and of two references: the prompt's end looped, and another
    clip's true continuation. With one clip there is no other, so no such row."""
    scores = {"the true continuation": [continuation_scores(mels[i], mels[i]) for i in idx],
              "repeat the prompt's end": [continuation_scores(mels[i], looped_prompt_end(mels[i]))
                                          for i in idx]}
    if len(idx) > 1:
        scores["another clip's true continuation"] = [
            continuation_scores(mels[i], mels[idx[(k + 1) % len(idx)]]) for k, i in enumerate(idx)]
    return scores

def sampled_continuations(net, inputs, mels, idx, tools, label):
    """Scores of the model's continuation of each clip's prompt, and the first clip's continuation
    as (wav, log-mel). Sampled at T=1, top-k 50, seeded by the clip's rank in idx."""
    import audio
    import whisper_gpt as W
    clip_scores, t0, shown = [], time.time(), time.time()
    for k, i in enumerate(idx):
        prompt_audio = {"codes": inputs[i]["codes"][:prompt_frames],
                        "mel": inputs[i]["mel"][:prompt_frames]}
        res = W.sample(net, None, audio=prompt_audio, prompt=None, tools=tools,
                       max_new_tokens=new_frames, prompt_frames=prompt_frames, temperature=1.0,
                       top_k=50, seed=k)
        wav = tools.decode(torch.cat([res["prompt_codes"], res["codes"]])).numpy()
        gen_mel = audio.log_mel(wav)
        clip_scores.append(continuation_scores(mels[i], gen_mel))
        if k == 0:
            first = wav, gen_mel
        # hundreds of clips take minutes: a line every 30 s, and one when done
        if time.time() - shown >= 30 or k == len(idx) - 1:
            shown = time.time()
            print(f"  continuations {label}: {progress(k + 1, len(idx), t0)} "
                  f"({(k + 1) / (shown - t0):.1f} clips/s)")
    return clip_scores, first

def continuations_file(d, clip_dir, idx):
    """Where run d's continuation scores of clip_dir's val clips idx are kept. The name is keyed as
    its evaluation is, plus what sampling adds: the clips, the frame counts, sample.py."""
    here = os.path.dirname(os.path.abspath(__file__))
    key = [evaluation_key(d, clip_dir), idx, prompt_frames, new_frames,
           code_digest(os.path.join(here, "sample.py"))]
    return os.path.join(d, f"cont-{hashlib.md5(json.dumps(key).encode()).hexdigest()[:12]}.json")

def kind_continuation_rows(kind, clips, clip_dir, model_list, seed, tools):
    """The table rows of one kind's held-out clips of clip_dir; none if no clip is long enough.
    Writes the first clip's wavs and picture."""
    import audio
    import sample as S
    need = prompt_frames + new_frames
    idx = [i for i, c in enumerate(clips) if c["kind"] == kind
           and c["frames"] >= need][:continuations]
    if not idx:
        return []
    inputs = {i: S.read_clip(clip_dir, "val", i)[0] for i in idx}
    truth = {i: inputs[i]["codes"][:need, :1] for i in idx}
    true_wavs = {i: tools.decode(truth[i]).numpy() for i in idx}
    mels = {i: audio.log_mel(true_wavs[i]) for i in idx}
    scores = reference_scores(mels, idx)
    panels = [("true: prompt | continuation", mels[idx[0]])]
    for model in [m for m in ("s", "hybrid", "hybrid_c0") if m in model_list]:
        d, label = run_dir(model, kind, seed), f"{kind}, {NAMES[model]}"
        path = continuations_file(d, clip_dir, idx)
        clip_scores = read_kept(path)
        if clip_scores is None:
            clip_scores, (wav, gen_mel) = sampled_continuations(load_run(d)[0], inputs, mels, idx,
                                                                tools, label)
            write_json(path, clip_scores)
        else:  # only the first clip again, for its wav and picture (the same draw: seed 0)
            _, (wav, gen_mel) = sampled_continuations(load_run(d)[0], inputs, mels, idx[:1], tools,
                                                      label)
            print(f"  continuations {label}: {len(clip_scores)} kept from an earlier call "
                  f"(checkpoint, clips and code unchanged)")
        panels.append((f"{NAMES[model]} (seed {seed} run): prompt | continuation", gen_mel))
        S.write_wav(os.path.join(out_root, "continuations", f"{kind}-{model}.wav"), wav,
                    audio.SAMPLE_RATE)
        scores[f"{NAMES[model]}, sampled (T=1, top-k 50)"] = clip_scores
    lines = []
    for name, clip_scores in scores.items():
        cells = [mean_std([r[c] for r in clip_scores]) for c in range(3)]
        lines.append(f"| {kind} | {name} | " + " | ".join(pm(m, sd) for m, sd in cells)
                     + f" | {len(clip_scores)} |")
    S.write_wav(os.path.join(out_root, "continuations", f"{kind}-true.wav"), true_wavs[idx[0]],
                audio.SAMPLE_RATE)
    audio.plot_mels(os.path.join(out_root, "continuations", f"{kind}.png"), panels,
                    title=f"{kind}: held-out val clip {idx[0]} of {clip_dir} "
                          f"({clips[idx[0]]['id']}), codebook 0 decoded",
                    boundary=prompt_frames / audio.FRAME_RATE)
    return lines

def continuation_rows(model_list, kind_list, seed):
    """The continuation table, from the val clips of test_dir if given (more of them, never seen),
    else of data_dir."""
    import sample as S
    clip_dir = test_dir or data_dir
    tools = S.Tools(clip_dir)
    with open(os.path.join(clip_dir, "val_clips.jsonl")) as f:
        clips = [json.loads(line) for line in f if line.strip()]
    lines = ["| data | continuation | frame-aligned log-mel L1 | time-averaged spectrum L1 | "
             "level modulation | clips |",
             "|---|---|---|---|---|---|"]
    for kind in kind_list:
        lines += kind_continuation_rows(kind, clips, clip_dir, model_list, seed, tools)
    lines.append("")
    lines.append(f"(mean +- standard deviation over clips; the first {prompt_frames} frames of "
                 f"each clip as prompt, {new_frames} frames generated and compared with the clip's "
                 f"next {new_frames}; val clips of {clip_dir}; every continuation, the true one "
                 f"included, decoded from codebook 0 alone by the data's codec; pictures and wavs "
                 f"in {out_root}/continuations)")
    return lines

# -----------------------------------------------------------------------------

if __name__ == "__main__":
    sys.stdout.reconfigure(line_buffering=True)  # progress lines show at once in a log file too
    signal.signal(signal.SIGINT, interrupted)
    settings, unknown, _ = configurator.parse("whisper_gpt_table.py", sys.argv[1:], globals(),
                                              pass_unknown=True)
    globals().update(settings)
    # train.py checks them (a bare --flag passed on as such)
    train_args = [f"--{k}" if raw is None else f"--{k}={raw}" for k, raw in unknown.items()]
    # the sweep sets these per run: given here they would make every run the same one
    for key, ours in (("seed", "--seeds"), ("out_dir", "--out_root"), ("model", "--models"),
                      ("init_from", "(runs resume by themselves)")):
        if key in unknown:
            fail(f"--{key}={unknown[key]}: the sweep sets it for each run; use {ours}")
    import train
    model_list, kind_list = models.split(","), kinds.split(",")
    for m in model_list:
        if m not in NAMES:  # a config file is not enough: the table has no row name for it
            fail(f"--models: no model {m!r} (models are among {', '.join(NAMES)})")
        if not os.path.isfile(f"config/whisper_gpt_{m}_cpu.py"):
            fail(f"--models: config/whisper_gpt_{m}_cpu.py not found (models are among "
                 f"{', '.join(NAMES)})")
    # a bad train.py setting fails here, before any run: train.py's message, its "train.py: "
    # prefix dropped, as this script's one-line error
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said):
            run_settings = {m: train.load_settings([f"config/whisper_gpt_{m}_cpu.py",
                                                    *train_args])[0] for m in model_list}
    except SystemExit:
        fail(said.getvalue().strip().removeprefix("train.py: ") + " (the settings not this "
             "script's go to train.py, for every run)")
    sys.stderr.write(said.getvalue())
    for s in run_settings.values():  # train.py checks these as it starts: here, before any run
        device = configurator.resolve_device("whisper_gpt_table.py", s["device"])
        configurator.resolve_dtype("whisper_gpt_table.py", s["dtype"], device)
    best_only = [m for m, s in run_settings.items() if not s["always_save_checkpoint"]]
    if best_only:  # set on the command line, or in a model's config file
        fail(f"always_save_checkpoint=False (for {', '.join(best_only)}): the table is of each "
             f"run's last weights, which a best-only checkpoint does not keep")
    try:
        seed_list = [int(s) for s in seeds.split(",")]
    except ValueError:
        fail(f"--seeds={seeds}: expected integers separated by commas")
    for name, given in (("models", model_list), ("kinds", kind_list), ("seeds", seed_list)):
        if len(set(given)) < len(given) or "" in given:
            fail(f"--{name}={','.join(map(str, given))}: each at most once, none empty")
    # a hybrid's prompt feeds the codec's stream decoder, whose first conv reads 7 frames
    least_prompt = 7 if any(m.startswith("hybrid") for m in model_list) else 1
    for name, value, least in (("jobs", jobs, 1), ("prompt_frames", prompt_frames, least_prompt),
                               ("new_frames", new_frames, 1), ("continuations", continuations, 0)):
        if value < least:
            fail(f"--{name}={value}: must be at least {least}")
    runs = [(m, k, s) for k in kind_list for m in model_list for s in seed_list]
    # where the results go, before the sweep: a bad one would fail after it
    configurator.check_folder("whisper_gpt_table.py", f"--out_root={out_root}", out_root)
    what = f"--out={out}" if out else f"--out (default {os.path.join(out_root, 'table1.md')})"
    out = out or os.path.join(out_root, "table1.md")
    if os.path.isdir(out) or out.endswith(os.sep):
        fail(f"{what}: a folder; name the markdown file to write")
    configurator.check_folder("whisper_gpt_table.py", what, os.path.dirname(os.path.abspath(out)))
    configurator.check_own_report("whisper_gpt_table.py", out, TITLE)  # never over another file
    import whisper_gpt as W
    block = max(run_settings[m]["block_size"] for m in model_list)
    try:  # the training data, every kind of it, both splits: before hours of training
        for kind in kind_list:
            d = W.load_data(data_dir, W.Config(block_size=block, kinds=kind))
            for split in ("train", "val"):
                W.split_frames(d, split)
    except (ValueError, OSError) as e:
        fail(f"--data_dir={data_dir}: {e}")
    if test_dir:  # before hours of training: the held-out codes of the same codec, every kind
        from audio import codec_id
        try:
            if codec_id(test_dir) != codec_id(data_dir):
                fail(f"--test_dir={test_dir}: its codes are of another codec than {data_dir}'s; "
                     f"prepare it with --codec_from={data_dir}")
            for kind in kind_list:
                W.split_frames(W.load_data(test_dir, W.Config(block_size=block, kinds=kind)), "val")
        except (ValueError, OSError) as e:
            fail(f"--test_dir={test_dir}: {e}")
    t0 = time.time()
    # codebook 0's mels (val_mel_c0.bin, ...): the hybrid_c0 runs train on them, the hybrid runs
    # are also scored on them
    if {"hybrid", "hybrid_c0"} & set(model_list):
        import prepare
        for d in (data_dir, test_dir):
            if d:
                prepare.codebook0_mels(d)
    sweep(runs, train_args)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    lines = [TITLE, "",
             f"`python whisper_gpt_table.py {' '.join(sys.argv[1:])}`", ""]
    eval_dirs = [(d, name) for d, name in ((data_dir, "results.json"),
                                           (test_dir, "results_test.json")) if d]
    # minutes of evaluation after the sweep: a line per run
    t_eval, n_eval = time.time(), 0
    print(f"evaluating {len(runs)} runs on the val clips of "
          f"{' and '.join(d for d, _ in eval_dirs)}")
    for eval_dir, name in eval_dirs:
        results = {}
        for r in runs:
            try:
                results[r], kept = evaluate_run(run_dir(*r), eval_dir)
            except (ValueError, OSError) as e:  # data changed since the runs (another codec, ...)
                fail(f"evaluating {run_dir(*r)} on {eval_dir}: {e}")
            n_eval += 1
            print(f"  evaluated {os.path.basename(run_dir(*r))} on {eval_dir}: NLL "
                  f"{results[r]['nll']:.3f}"
                  + (" (kept from an earlier call: checkpoint, data and code unchanged)" if kept
                     else "") + f" ({progress(n_eval, len(eval_dirs) * len(runs), t_eval)})")
        write_json(os.path.join(out_root, name),
                   {f"{m}-{k}-s{s}": v for (m, k, s), v in results.items()}, indent=1)
        if eval_dir == test_dir:
            lines += ["", f"## The same runs on held-out clips ({test_dir})", ""]
        lines += table(results, model_list, kind_list, seed_list, train_args, eval_dir)
    if continuations:
        cont = continuation_rows(model_list, kind_list, seed_list[0])
        lines += ["", "## Continuations of held-out clips", ""] + cont
    device = next((a.split("=", 1)[1] for a in train_args if a.startswith("--device=")), "cpu")
    lines += ["", f"(Python {sys.version.split()[0]}, torch {torch.__version__}, device {device}, "
              f"{os.cpu_count()} cores, {jobs} runs side by side with one thread each; this call "
              f"took {fmt_time(time.time() - t0)})"]
    print("\n".join(lines))  # first: a failed write below loses no table
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    except OSError as e:
        fail(f"--out={out}: its folder cannot be made ({e}); the table is printed above")
    configurator.write_report("whisper_gpt_table.py", out, lines)
