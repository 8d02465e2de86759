"""
Speed and memory of Whisper-GPT's three paper-sized models (config/whisper_gpt_{s,hybrid,l}.py), on
whatever device this runs on (a CPU by default).

    python bench_whisper_gpt.py                      # both parts, a few minutes on a 2-core CPU
    python bench_whisper_gpt.py --part=generate --new_tokens=750 --out=bench.md

Training: tokens/s of forward + backward + AdamW step, and the peak memory. A few iterations are
timed after a warm-up one, on random tokens and mels (speed does not depend on the data). Peak
memory is the process's resident memory on a CPU, what torch allocated on a GPU. Each model runs
in a process of its own, so that the peaks do not mix. On a GPU both parts run under bfloat16
autocast, as train.py and sample.py do there.

Generation: new_tokens coarse tokens (750 = 10 s of audio) after a 1 s prompt from a val clip,
sampled with top-k 50. Each way is timed `repeats` times; the median is reported, with the min-max.
The ways:
  - with the KV cache (model.generate, as sample.py does); on a GPU also with its steps replayed
    from one CUDA graph (cuda_graph=True);
  - by full recomputation: every step runs the whole current window again (the same windows and
    restarts).
Both for GPT-S (tokens only) and for the hybrid. The hybrid's per-step mel is included, and also
reported on its own: the data's codec decodes the new frame of codebook 0 (keeping its state),
then one log-mel frame is computed. The hybrid is also timed with a dense codec (EnCodec's
architecture, random weights): the data's codec (the block DCT prepare.py fits into EnCodec's
layers) has parts the streaming decoder skips, a pretrained one has not.

Goals: KV cache >= 10x recomputation at 750 tokens; hybrid decode <= 2x token-only.
"""

import json
import os
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import torch

import configurator

# -----------------------------------------------------------------------------
part = "all"            # all | train | generate
iters = 3               # timed training iterations (after one warm-up)
batch_size = 8          # training windows per iteration (the paper-sized configs use 64 on a GPU)
new_tokens = 750
repeats = 3             # each way of generating timed this many times: the median is reported
data_dir = "data/synth"  # the codec and a prompt for generation
device = "cpu"         # cpu | cuda | auto
out = ""                # also write the markdown here
child = ""              # (internal) the model a child process measures the training speed of
# -----------------------------------------------------------------------------

TITLE = "# Whisper-GPT speed and memory (bench_whisper_gpt.py)"  # the first line of --out
MODELS = (("s", "GPT-S"), ("hybrid", "Hybrid"), ("l", "GPT-L"))
TOP_K = 50            # every way samples the same: temperature 1, top-k 50
PROMPT_FRAMES = 75    # 1 s of codes (75 frames/s)

def fail(msg):
    configurator.fail("bench_whisper_gpt.py", msg)

def model_config(name):
    """The Config of config/whisper_gpt_{name}.py (its model fields; the rest are train.py's)."""
    import whisper_gpt as W
    values = {}
    # beside this file, not in the current folder: the script may be run from anywhere
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config",
                        f"whisper_gpt_{name}.py")
    exec(open(path).read(), {}, values)
    fields = W.Config.__dataclass_fields__
    return W.Config(**{k: v for k, v in values.items() if k in fields})

def peak_memory_mb():
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes

def autocast():
    """bfloat16 on a GPU (train.py's and sample.py's default there), float32 on a CPU."""
    return torch.autocast("cuda", torch.bfloat16, enabled=device.startswith("cuda"))

def check_data_dir():
    """Read what the generation part needs of data_dir: meta.json, the codec, a val clip. Checked
    before the training part, which a bad data_dir would otherwise fail after."""
    from audio import load_codec
    if not os.path.isfile(os.path.join(data_dir, "meta.json")):
        fail(f"--data_dir={data_dir}: no meta.json there (prepare.py writes it)")
    clips = os.path.join(data_dir, "val_clips.jsonl")
    try:
        load_codec(data_dir)
        with open(clips) as f:
            if not any(line.strip() for line in f):
                fail(f"--data_dir={data_dir}: {clips} has no clip to prompt with")
    except (ValueError, OSError, KeyError) as e:
        fail(f"--data_dir={data_dir}: {e}")
    # the prompt clip itself (its line, mel and codes), read now rather than after the training
    # part (a bad one stops in one line from sample.py's reader, naming the file)
    import sample as S
    S.read_clip(data_dir, "val", 0)

def conditions():
    """The line that says what the figures were measured under, as the project asks of a benchmark:
    the device by name ("device cpu" alone named no machine), the versions, and the load: the
    1-minute load average before the benchmark starts, i.e. what else was running."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = "unknown CPU"
        if os.path.exists("/proc/cpuinfo"):  # Linux; platform.processor() is often empty there
            name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                         if line.startswith("model name")), name)
    load = f"load average {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "load unknown"
    return (f"Python {sys.version.split()[0]}, torch {torch.__version__}, numpy {np.__version__}, "
            f"device {device} ({name}), {torch.get_num_threads()} threads, {os.cpu_count()} "
            f"cores, {load} at the start")

def sync():
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))

# -----------------------------------------------------------------------------
# training speed, one model per process

def train_one(name):
    """Training speed and peak memory of one model, measured in this process."""
    import whisper_gpt as W
    base = peak_memory_mb()
    torch.manual_seed(0)
    config = model_config(name)
    model = W.Model(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    B, T = batch_size, config.block_size
    codes = torch.randint(0, config.vocab_size, (B, T), device=device)
    mels = torch.randn(B, T, config.n_mels, device=device) if config.use_mel else None
    times = []
    for i in range(iters + 1):
        t0 = time.perf_counter()
        with autocast():
            _, loss = model(codes, mels, targets=codes)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i:
            times.append(time.perf_counter() - t0)
    dt = float(np.median(times))
    return {"params": model.get_num_params(), "tokens_per_s": B * T / dt, "s_per_iter": dt,
            "peak_mb": peak_memory_mb(), "before_model_mb": base}

def train_table():
    memory = ("peak GPU memory torch allocated" if device.startswith("cuda")
              else "peak resident memory of the process")
    lines = [f"Training (batch {batch_size} x {model_config('s').block_size} frames, median of "
             f"{iters} iterations after a warm-up one; {memory}, and what it was before the model "
             f"was built)", "",
             "| model | params | tokens/s | ms/iteration | peak memory | before the model |",
             "|---|---|---|---|---|---|"]
    for name, label in MODELS:
        args = [sys.executable, __file__, f"--child={name}"]
        args += [f"--{k}={globals()[k]}" for k in ("iters", "batch_size", "device")]
        res = subprocess.run(args, capture_output=True, text=True)
        if res.returncode:
            fail(f"training benchmark of {label} failed:\n{res.stderr}")
        r = json.loads(res.stdout.strip().splitlines()[-1])
        lines.append(f"| {label} | {r['params'] / 1e6:.2f}M | {r['tokens_per_s']:.0f} | "
                     f"{r['s_per_iter'] * 1e3:.1f} | {r['peak_mb']:.0f} MB | "
                     f"{r['before_model_mb']:.0f} MB |")
        print(lines[-1], flush=True)
    return lines

# -----------------------------------------------------------------------------
# generation speed: KV cache vs full recomputation, hybrid vs token-only

@torch.no_grad()
def generate_recompute(model, codes, mels, n, mel_fn, generator):
    """model.generate without a cache: each new token runs the whole current window (the same
    restarts)."""
    c = model.config
    seq, frames = codes, (list(mels.unbind(1)) if c.use_mel else [])
    start = max(0, seq.size(1) - c.block_size)
    for i in range(n):
        t = seq.size(1)
        if c.use_mel and t - 1 - c.mel_lag >= len(frames):
            frames.append(mel_fn(seq, t - 1 - c.mel_lag))
        if t - start > c.block_size:
            start = t - c.block_size // 2
        z = torch.zeros_like(frames[0]) if c.use_mel else None
        step_mels = (torch.stack([frames[s - c.mel_lag] if s - c.mel_lag >= start else z
                                  for s in range(start, t)], 1)
                     if c.use_mel else None)
        logits, ids = torch.topk(model.logits(seq[:, start:], step_mels)[:, -1].float(), TOP_K)
        nxt = ids.gather(-1, torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
        seq = torch.cat([seq, nxt], 1)
    return seq

def generate_table():
    import audio
    import sample as S
    import whisper_gpt as W
    tools = S.Tools(data_dir)
    clip, _ = S.read_clip(data_dir, "val", 0)
    tools.codec()  # loaded now, outside the timings
    # EnCodec's architecture with random weights (audio.offline_codec() before any fitting): a
    # pretrained EnCodec's per-frame cost, in which the streaming decoder finds no no-op parts
    dense_tools = S.Tools(data_dir)
    dense_tools._codec = audio.offline_codec()
    rows, times = [], {}
    for name, label in MODELS[:2]:
        torch.manual_seed(0)
        config = model_config(name)
        model = W.Model(config).eval().to(device)
        codes = clip["codes"][:PROMPT_FRAMES, :1].T.to(device)
        # as sample() gives them: the last mel_lag frames are made from the codes
        mels = (clip["mel"][:PROMPT_FRAMES - config.mel_lag][None].to(device) if config.use_mel
                else None)
        mel_seconds = [0.0]
        fresh_mel_fn = lambda: W.incremental_mel(tools, config.mel_lag) if config.use_mel else None
        # untimed runs first: first-call costs are not the model's speed (allocator, BLAS; on a GPU,
        # at full length, every kernel's build and autotuning per length bucket). The CUDA graph's
        # capture stays timed, as sample.py pays it
        with autocast():
            for graphed in (False, True) if device.startswith("cuda") else (False,):
                model.generate(codes, mels, new_tokens if device.startswith("cuda") else 20,
                               temperature=1.0, top_k=TOP_K, mel_fn=fresh_mel_fn(),
                               cuda_graph=graphed)
            if device.startswith("cuda"):  # recomputation's windows reach lengths the cache's do not
                generate_recompute(model, codes, mels, new_tokens, fresh_mel_fn(), None)
            if config.use_mel:  # the dense codec's first calls too
                model.generate(codes, mels, 20, temperature=1.0, top_k=TOP_K,
                               mel_fn=W.incremental_mel(dense_tools, config.mel_lag))

        def timed(mel_fn):
            def wrapped(seq, j):
                t0 = time.perf_counter()
                m = mel_fn(seq, j)
                mel_seconds[0] += time.perf_counter() - t0
                return m
            return wrapped

        ways = ("KV cache", "recompute") + (("KV cache, dense codec",) if config.use_mel else ())
        if device.startswith("cuda"):  # the steps replayed from one CUDA graph
            ways += ("KV cache, CUDA graph",)
        for way in ways:
            runs = []  # (seconds, of which the per-step mel), one per repeat
            for _ in range(repeats):
                mel_seconds[0] = 0.0
                mel_tools = dense_tools if way.endswith("dense codec") else tools
                mel_fn = (timed(W.incremental_mel(mel_tools, config.mel_lag)) if config.use_mel
                          else None)
                g = torch.Generator(device=device).manual_seed(0)
                sync()
                t0 = time.perf_counter()
                with autocast():
                    if way.startswith("KV cache"):
                        seq = model.generate(codes, mels, new_tokens, temperature=1.0,
                                             top_k=TOP_K, mel_fn=mel_fn, generator=g,
                                             cuda_graph=way.endswith("CUDA graph"))
                    else:
                        seq = generate_recompute(model, codes, mels, new_tokens, mel_fn, g)
                sync()
                runs.append((time.perf_counter() - t0, mel_seconds[0]))
                assert seq.shape[1] == codes.shape[1] + new_tokens
            runs.sort()
            dt, mel_s = runs[(len(runs) - 1) // 2]  # the median run (the faster middle one)
            times[(name, way)] = dt
            mel_share = "-"
            if config.use_mel:
                mel_share = f"{mel_s:.1f} s ({100 * mel_s / dt:.0f}%)"
            spread = f"{runs[0][0]:.2f}-{runs[-1][0]:.2f}" if repeats > 1 else f"{dt:.2f}"
            rows.append(f"| {label} | {way} | {new_tokens / dt:.1f} | {dt:.2f} | {spread} | "
                        f"{mel_share} |")
            print(rows[-1], flush=True)
    # 3 significant digits: 10 s for 750 tokens, and not "0 s" for a short run's 10
    lines = [f"Generation ({new_tokens} new tokens = {new_tokens / 75:.3g} s of audio after a 1 s "
             f"prompt, block_size {model_config('s').block_size}, top-k {TOP_K}; the median of "
             f"{repeats} timed runs each)", "",
             "| model | how | tokens/s | seconds | min-max | of which the per-step mel |",
             "|---|---|---|---|---|---|", *rows, ""]
    for name, label in MODELS[:2]:
        lines.append(f"- {label}: KV cache at "
                     f"{times[(name, 'recompute')] / times[(name, 'KV cache')]:.1f}x "
                     f"recomputation's speed (goal >= 10x)")
    lines.append(f"- hybrid / token-only decode time, KV cache, per-step mel included: "
                 f"{times[('hybrid', 'KV cache')] / times[('s', 'KV cache')]:.2f}x (goal <= 2x); "
                 f"with a dense codec (a pretrained EnCodec's cost): "
                 f"{times[('hybrid', 'KV cache, dense codec')] / times[('s', 'KV cache')]:.2f}x")
    if device.startswith("cuda"):
        for name, label in MODELS[:2]:
            lines.append(f"- {label}, CUDA graph: at "
                         f"{times[(name, 'recompute')] / times[(name, 'KV cache, CUDA graph')]:.1f}x "
                         f"recomputation's speed")
        lines.append(f"- hybrid / token-only, both CUDA graphs: "
                     f"{times[('hybrid', 'KV cache, CUDA graph')] / times[('s', 'KV cache, CUDA graph')]:.2f}x")
    return lines

# -----------------------------------------------------------------------------

if __name__ == "__main__":
    # Ctrl-C: one line, not a traceback (nothing is written before the end)
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(
        "\nbench_whisper_gpt.py: interrupted; nothing was written"))
    settings, _, _ = configurator.parse("bench_whisper_gpt.py", sys.argv[1:], globals())
    globals().update(settings)
    device = configurator.resolve_device("bench_whisper_gpt.py", device)
    if part not in ("all", "train", "generate"):
        fail(f"--part={part}: expected all, train or generate")
    for key in ("iters", "batch_size", "new_tokens", "repeats"):
        if globals()[key] < 1:
            fail(f"--{key}={globals()[key]}: must be at least 1")
    try:  # the models' attention reads the FUSED_ATTENTION* variables as it is imported
        import fused_attention  # noqa: F401
    except ValueError as e:  # one of them mistyped: one line now, not a traceback later
        fail(str(e))
    if child:
        if child not in dict(MODELS):
            fail(f"--child={child}: expected one of {', '.join(dict(MODELS))} (an internal "
                 f"setting: the benchmark runs each model's training in a child of its own)")
        print(json.dumps(train_one(child)))
        sys.exit(0)
    # before the benchmark: a bad --out or --data_dir would fail after minutes of it
    if out:
        configurator.check_out_file("bench_whisper_gpt.py", out, TITLE)
    if part in ("all", "generate"):
        check_data_dir()
    lines = [TITLE, "", conditions(), ""]
    if part in ("all", "train"):
        lines += train_table() + [""]
    if part in ("all", "generate"):
        lines += generate_table()
    print("\n".join(lines))
    if out:
        configurator.write_report("bench_whisper_gpt.py", out, lines)
