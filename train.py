"""
Training script for every model of this repository (whisper_gpt, salmonn, pengi), nanoGPT style.

    python train.py config/whisper_gpt_quick.py --max_iters=100 --batch_size=8
    # DDP, one process per GPU; gradient_accumulation_steps counts the micro-steps of all of them
    torchrun --standalone --nproc_per_node=4 train.py config/whisper_gpt_s.py --gradient_accumulation_steps=4

Settings come from the defaults below, then the config file(s) and --key=value, in the order given
(the later wins). A key is either a training setting below or a field of the model's Config
dataclass; anything else is an error.

train.py knows a model only through the interface every model file implements: Config, Model,
load_data, get_batch and an optional init_pretrained (docs/training.md, "The model interface").
Four exceptions: it checks Whisper-GPT's codec_id against init_from's, counts a batch without
targets (SALMONN's tagging stage) as clips, reads the tokenizer an llm_init checkpoint records, and
names the *_init settings when init_from is another stage's checkpoint (SALMONN, Pengi).
A text model's Config names its tokenizer ("corpus" or "gpt2"); its checkpoints record it.
"""

import fcntl
import gc
import glob
import importlib
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, fields

import numpy as np
import torch

import configurator
import tokenizer as tokenizers  # text models name one in their config; whisper_gpt has none

# -----------------------------------------------------------------------------
# default settings
# I/O
out_dir = "out"
model = "whisper_gpt"         # the model file: whisper_gpt | salmonn | pengi
data_dir = "data/synth"       # what prepare.py wrote
# scratch | resume (out_dir/ckpt.pt) | a ckpt.pt path (its weights, a fresh optimizer)
init_from = "scratch"
# out_dir already holds ckpt.pt: False resumes the run (same settings), skips it (finished) or
# stops (other settings); True trains anew there
overwrite = False
eval_interval = 200
log_interval = 10
eval_iters = 20               # batches per split for the train/val loss estimate
eval_only = False             # evaluate once and exit
always_save_checkpoint = True  # False: save only when the val loss improves
# logging
wandb_log = False
wandb_project = "nano-audio-llm"
wandb_run_name = "run"
# data
batch_size = 16               # per process and micro-step
gradient_accumulation_steps = 1  # in total, over all processes
# AdamW
learning_rate = 1e-3
max_iters = 2000
weight_decay = 0.1            # on parameters with dim >= 2 only
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0               # 0 = off
# learning rate: linear warmup, then cosine down to min_lr at lr_decay_iters
decay_lr = True
warmup_iters = 100
lr_decay_iters = 0            # 0 = max_iters
min_lr = 1e-4
# system
device = "auto"               # auto | cpu | cuda | cuda:1 | mps
dtype = "auto"                # auto | float32 | bfloat16 | float16 (float16 uses a GradScaler)
compile = False               # torch.compile the model
backend = "auto"              # DDP backend: auto = nccl on CUDA, gloo on CPU
ddp_find_unused_parameters = False
seed = 1337
peak_flops = 0.0              # per device, for MFU; 0 = known GPUs (A100, H100, H200) at bf16
# -----------------------------------------------------------------------------

TRAIN_DEFAULTS = configurator.defaults(globals())
# settings that change how a run executes, not what it trains: a re-run may differ in these
RUN_KEYS = {"init_from", "out_dir", "overwrite", "eval_only", "log_interval", "wandb_log",
            "wandb_project", "wandb_run_name", "device", "dtype", "compile", "backend",
            "ddp_find_unused_parameters", "peak_flops"}
HERE = os.path.dirname(os.path.abspath(__file__))  # the model files sit beside this one

def fail(msg):
    configurator.fail("train.py", msg)

def model_defaults(name):
    """The model file's Config defaults: what a run that did not set a model field had."""
    return {f.name: f.default for f in fields(importlib.import_module(name).Config)}

def save_atomic(obj, path):
    """torch.save written whole (configurator.written_whole), flushed to the disk before the
    rename: a kill or a power loss leaves the old file or the new one, never a part of one. A save
    that fails (a full disk) removes its part and raises."""
    with configurator.written_whole(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())

def write_failed(path, e):
    """The one line for a file that cannot be written (a full disk, a folder gone)."""
    fail(f"{path}: cannot be written ({type(e).__name__}: {str(e).splitlines()[0][:200]}); is "
         f"the disk full? What was there before is kept")

def save_or_stop(obj, path):
    """save_atomic, or write_failed's line (torch.save on a full disk raises RuntimeError)."""
    try:
        save_atomic(obj, path)
    except (OSError, RuntimeError) as e:
        write_failed(path, e)

def load_checkpoint(path, map_location="cpu", mmap=False):
    """A checkpoint written by train.py, or a ValueError that names the file. The file may be
    missing, truncated, corrupt or not train.py's (a crash leaves none half-written: save_atomic).
    mmap=True maps the weights instead of reading them, for a look at the settings."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: checkpoint not found")
    with open(path, "rb") as f:
        head = f.read(2)
    if head and head != b"PK" and head[:1] != b"\x80":  # neither torch.save's zip nor a pickle
        raise ValueError(f"{path}: not a checkpoint (torch.save writes a zip archive; this file is "
                         f"not one)")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:160]  # a sentence
        raise ValueError(f"{path}: cannot be read as a checkpoint, it is truncated or corrupt "
                         f"({type(e).__name__}: {first})") from None
    missing = [k for k in ("model", "model_name", "model_args", "iter_num", "config")
               if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise ValueError(f"{path}: not a checkpoint of train.py (it has no {', '.join(missing)})")
    if not os.path.isfile(os.path.join(HERE, f"{ck['model_name']}.py")):
        raise ValueError(f"{path}: holds a {ck['model_name']!r} model, which has no model file "
                         f"here")
    unknown = sorted(set(ck["model_args"]) - set(model_defaults(ck["model_name"])))
    if unknown:  # written by a model file with fields this one lacks (another version of it)
        raise ValueError(f"{path}: its {ck['model_name']} model has settings that "
                         f"{ck['model_name']}.py's Config lacks: {', '.join(unknown)}")
    return ck

def check_finite(ck, path):
    """A ValueError naming the first tensor of the weights or optimizer state that holds a NaN or
    inf: damage inside the file that torch.load cannot see (its tensors carry no checksum)."""
    def tensors(tree, name):
        if torch.is_tensor(tree):
            yield name, tree
        elif isinstance(tree, dict):
            for k, v in tree.items():
                yield from tensors(v, f"{name}.{k}")
        elif isinstance(tree, (list, tuple)):
            for i, v in enumerate(tree):
                yield from tensors(v, f"{name}.{i}")
    for part in ("model", "optimizer"):
        for name, t in tensors(ck.get(part, {}), part):
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"{path}: {name} holds NaN or inf values: the file is damaged "
                                 f"(or was saved from a run that diverged)")

def writer_hint(ckpt_path):
    """A hint naming the config files whose out_dir holds ckpt_path (", e.g. python train.py
    config/X.py"), or ""."""
    # out_dir is relative to where train.py runs
    folder = os.path.abspath(os.path.dirname(ckpt_path))
    configs = []
    for path in sorted(glob.glob(os.path.join(HERE, "config", "*.py"))):
        try:
            out_dir = configurator.read_config_file(path).get("out_dir")  # as a run reads the file
        except configurator.SettingsError:  # a user's broken config is not this message's business
            continue
        if out_dir and os.path.abspath(out_dir) == folder:
            configs.append(f"python train.py {os.path.relpath(path, HERE)}")
    return f", e.g. {' or '.join(configs)}" if configs else ""

def unset_defaults(new, old):
    """The model file's Config defaults when both runs are of one model file, else {}. A settings
    dict holds only the model fields a run set; one it left out had its default."""
    name = new.get("model")
    return model_defaults(name) if name and name == old.get("model") else {}

def changed_settings(new, old, skip=()):
    """The sorted keys whose values differ between two runs' settings dicts. RUN_KEYS and skip are
    left out; an unset model field counts as its default."""
    defaults = unset_defaults(new, old)
    return sorted(k for k in set(new) | set(old)
                  if k not in RUN_KEYS and k not in skip
                  and new.get(k, defaults.get(k)) != old.get(k, defaults.get(k)))

def describe_changes(keys, new, old):
    """The first five changed settings, as "key=old there, new here" (arguments in
    changed_settings' order)."""
    defaults = unset_defaults(new, old)
    return ", ".join(f"{k}={old.get(k, defaults.get(k))!r} there, "
                     f"{new.get(k, defaults.get(k))!r} here" for k in keys[:5])

def same_start(a, b):
    """Whether two init_from values name the same start: scratch, or the same checkpoint file."""
    paths = [os.path.realpath(x) if x not in ("scratch", "resume") else x for x in (a, b)]
    return paths[0] == paths[1]

def check_rerun(S, out_dir, init_from, max_iters, master):
    """A re-run into an out_dir that holds a checkpoint, without --overwrite: nothing already
    trained is lost. Another run's settings stop it; the same run, finished, exits; the same run,
    unfinished, returns (to be resumed)."""
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    try:
        prev = load_checkpoint(ckpt_path, "cpu", mmap=True)  # its settings only
    except ValueError as e:
        fail(f"{e} (out_dir={out_dir}; --overwrite=True trains anew there)")
    if prev["model_name"] != S["model"]:  # not a settings change: another model altogether
        fail(f"out_dir={out_dir} holds a {prev['model_name']} run, not {S['model']}: choose "
             f"another out_dir, or --overwrite=True trains anew there")
    changed = changed_settings(S, prev["config"])
    # the weights a run started from are part of what it trained ("resume" says nothing)
    started = prev["config"].get("init_from", "scratch")
    if started != "resume" and not same_start(started, init_from):
        changed.append("init_from")
    if changed:
        fail(f"out_dir={out_dir} holds a run with other settings ("
             + describe_changes(changed, S, prev["config"])
             + "): --init_from=resume continues it, --overwrite=True trains anew there, or "
               "choose another out_dir")
    # a best-only run's checkpoint is of its best iteration; end_iter notes where the run ended
    end_iter = prev.get("end_iter", prev["iter_num"])
    if end_iter >= max_iters:
        if master:
            print(f"{ckpt_path}: this run is finished (iter {end_iter}), nothing to do "
                  f"(--overwrite=True trains anew)")
        sys.exit(0)
    if master:
        print(f"{ckpt_path}: the same run {resume_point(prev)}; resuming it")

def resume_point(ck):
    """Where a run resumes: the iteration it stopped at or, for a run that saved only its best
    weights, the iteration of those (the iterations after it are trained again)."""
    if ck["config"].get("always_save_checkpoint", True):
        return f"stopped at iter {ck['iter_num']}"
    return (f"saved only its best weights (always_save_checkpoint=False), of iter "
            f"{ck['iter_num']}: the iterations after it are trained again")

def check_arrays(data_dir):
    """Check data_dir's prepared files before the model file reads them: its errors would not name
    the file. A ValueError names each array (codes, mels) that is cut short (not whole rows) or
    empty (a split without clips: numpy cannot map it), a clip-list line that is not JSON, and a
    meta.json of another shape. A missing or unreadable meta.json is left to the model's
    load_data."""
    if os.path.isfile(data_dir):
        raise ValueError(f"data_dir {data_dir}: a file, not the folder prepare.py writes")
    try:
        with open(os.path.join(data_dir, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return
    ok = isinstance(meta, dict) and isinstance(meta.get("whisper_mel", {}), dict)
    widths = {"codes": meta.get("n_q"), "mel": meta.get("n_mels"), "mel_c0": meta.get("n_mels"),
              "wmel": meta.get("whisper_mel", {}).get("n_mels")} if ok else {}
    if not ok or not all(w is None or (type(w) is int and w > 0) for w in widths.values()):
        raise ValueError(f"data_dir {data_dir}: meta.json is not prepare.py's (an object whose "
                         f"n_mels, n_q and whisper_mel.n_mels are whole numbers); prepare.py "
                         f"again")
    empty, cut = [], []
    for split in ("train", "val"):
        for array, width in widths.items():
            path = os.path.join(data_dir, f"{split}_{array}.bin")
            if width and os.path.isfile(path):
                size = os.path.getsize(path)
                if size == 0:
                    empty.append(os.path.basename(path))
                elif size % (2 * width):  # uint16 codes, float16 mels: 2 bytes a value
                    cut.append(f"{os.path.basename(path)} ({size} bytes, not whole rows of "
                               f"{width} values)")
    if cut:
        raise ValueError(f"data_dir {data_dir}: {', '.join(cut)}: cut short or of other data; "
                         f"prepare.py again")
    for split in ("train", "val"):  # the clip lists: a cut line is a JSON error naming no file
        path = os.path.join(data_dir, f"{split}_clips.jsonl")
        if os.path.isfile(path):
            with open(path) as f:
                for i, line in enumerate(f, 1):
                    try:
                        if line.strip():
                            json.loads(line)
                    except ValueError as e:
                        raise ValueError(f"data_dir {data_dir}: {os.path.basename(path)} line {i} "
                                         f"is not JSON ({e}): cut short or edited; prepare.py "
                                         f"again") from None
    if empty:
        raise ValueError(f"data_dir {data_dir}: {', '.join(empty)} empty: a split without clips "
                         f"(prepared with --val_percent=0, or from one clip); training and "
                         f"evaluation read both splits")

def load_model_data(M, data_dir, config, tok):
    """M.load_data after check_arrays. A field missing from meta.json or the clip lists is a
    ValueError that names data_dir, not a bare KeyError."""
    check_arrays(data_dir)
    try:
        return M.load_data(data_dir, config, tok)
    except KeyError as e:
        raise ValueError(f"data_dir {data_dir}: its meta.json or clip lists lack the field {e}; "
                         f"prepare.py writes them (re-run it for this data)") from None

def load_weights(model, state, trained_args, built_for):
    """Load a checkpoint's weights (state) into model. trained_args: the model_args they were
    trained with; built_for: what the model's config came from, for the message (a data dir, whose
    load_data may set sizes, or e.g. "the checkpoint's model_args"). Weights that do not fit are a
    ValueError that names each field of model.config that differs from trained_args."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        changed = [f"{k}={v!r} in the checkpoint, {getattr(model.config, k)!r} from {built_for}"
                   for k, v in trained_args.items() if getattr(model.config, k) != v]
        raise ValueError(f"its weights do not fit the model built for {built_for}"
                         + (f" ({'; '.join(changed)})" if changed else "")
                         + f": {' '.join(str(e).split())[:240]}") from None

def load_settings(argv):
    """defaults <- config files <- --key=value, in the order given. Returns (settings dict, model
    module, model keys)."""
    try:
        entries, _ = configurator.gather(argv, config_files=True)
    except configurator.SettingsError as e:
        fail(e)
    # the model file (the last model = ... given) defines which model keys exist
    name, where = TRAIN_DEFAULTS["model"], "default"
    for key, value, raw, source in entries:
        if key == "model":
            name, where = (raw if raw is not None else value), source
    if (not isinstance(name, str) or not name.isidentifier()  # a path is no model name
            or not os.path.isfile(os.path.join(HERE, f"{name}.py"))):
        fail(f"model = {name!r} ({where}): no such model file; expected whisper_gpt, salmonn or "
             f"pengi")
    module = configurator.import_model("train.py", name)
    lacking = [n for n in ("Config", "Model", "load_data", "get_batch") if not hasattr(module, n)]
    if lacking:
        fail(f"model = {name!r} ({where}): {name}.py is not a model file (it has no "
             f"{', '.join(lacking)}); expected whisper_gpt, salmonn or pengi")
    model_types = {f.name: f.type for f in fields(module.Config)}  # int, float, bool or str
    types = {k: type(v) for k, v in TRAIN_DEFAULTS.items()}
    types.update(model_types)
    try:
        settings, _ = configurator.resolve(entries, types,
                                           what=f"a train.py setting nor a field of {name}.Config")
    except configurator.SettingsError as e:
        fail(e)
    return {**TRAIN_DEFAULTS, **settings}, module, set(model_types)

def choose_tokenizer(config, data_dir, ckpt_path, checkpoint, init_from, init):
    """The tokenizer of a text model; None for a model without text (whisper_gpt). Its config
    names one: "corpus" (the BPE stored with data_dir) or "gpt2". A model that starts from a
    checkpoint keeps the tokenizer recorded there, since its embeddings are in those tokens. The
    checkpoints looked at: the resumed one (checkpoint, loaded from ckpt_path), init (init_from's),
    and an llm_init ckpt.pt (or a run folder holding one). The prepared data is text, so any
    tokenizer reads it."""
    name = getattr(config, "tokenizer", None)
    if name is None:
        return None
    starts = [(ckpt_path, checkpoint), (init_from, init)]
    llm_init = getattr(config, "llm_init", "")
    if llm_init and os.path.isdir(llm_init):  # a folder: its ckpt.pt, if that is what loads
        hf = [n for n in ("model.safetensors", "pytorch_model.bin")
              if os.path.exists(os.path.join(llm_init, n))]
        llm_init = "" if hf else os.path.join(llm_init, "ckpt.pt")
    if llm_init.endswith(".pt") and os.path.isfile(llm_init):
        try:
            starts.append((llm_init, torch.load(llm_init, map_location="cpu", weights_only=True,
                                                mmap=True)))
        except Exception as e:
            fail(f"llm_init={llm_init}: cannot be read as a checkpoint, it is empty, truncated or "
                 f"corrupt ({type(e).__name__})")
    for path, ck in starts:
        if isinstance(ck, dict) and ck.get("tokenizer"):
            if ck["tokenizer"]["name"] != name:
                fail(f"{path} was trained with tokenizer {ck['tokenizer']['name']!r}, but "
                     f"tokenizer={name!r}")
            tok = tokenizers.tokenizer_from_record(ck["tokenizer"], path)
            print(f"tokenizer: {name}, {tok.n_vocab} tokens, as recorded in {path}")
            return tok
    try:
        tok = tokenizers.load_tokenizer(data_dir, name)
    except (ValueError, OSError, RuntimeError) as e:  # the message names the bad name or file
        fail(str(e))
    where = f", from {data_dir}" if name == "corpus" else ""
    print(f"tokenizer: {name}, {tok.n_vocab} tokens{where}")
    return tok

if __name__ == "__main__":
    S, M, model_keys = load_settings(sys.argv[1:])
    globals().update({k: v for k, v in S.items() if k in TRAIN_DEFAULTS})
    for key in ("batch_size", "gradient_accumulation_steps", "eval_interval", "eval_iters",
                "log_interval"):
        if S[key] < 1:
            fail(f"{key}={S[key]}: must be at least 1")
    for key in ("max_iters", "warmup_iters", "lr_decay_iters", "learning_rate", "min_lr",
                "weight_decay", "grad_clip", "peak_flops"):
        if not 0 <= S[key] < math.inf:
            fail(f"{key}={S[key]}: must be a finite number, at least 0")
    for key in ("beta1", "beta2"):
        if not 0 <= S[key] < 1:
            fail(f"{key}={S[key]}: must be at least 0 and below 1")
    if S["decay_lr"] and S["min_lr"] > S["learning_rate"]:  # the schedule would rise
        fail(f"min_lr={S['min_lr']}: above learning_rate={S['learning_rate']}, the rate the "
             f"schedule decays from")
    # the rate would drop to min_lr at once after the warmup
    if S["decay_lr"] and 0 < S["lr_decay_iters"] < S["warmup_iters"]:
        fail(f"lr_decay_iters={S['lr_decay_iters']}: below warmup_iters={S['warmup_iters']}; the "
             f"cosine decay starts after the warmup (0 decays until max_iters)")
    known = getattr(getattr(torch.distributed, "Backend", None), "backend_list", ["nccl", "gloo"])
    backends = ["auto"] + [b for b in known if b != "undefined"]  # (a torch built without them)
    if S["backend"] not in backends:
        fail(f"backend={S['backend']!r}: the DDP backend is one of {', '.join(backends)} (auto: "
             f"nccl on CUDA, gloo on a CPU)")
    if not 0 <= S["seed"] < 2 ** 63:  # numpy's and torch's generators take these
        fail(f"seed={S['seed']}: must be at least 0 and below 2**63")
    if S["overwrite"] and S["init_from"] == "resume":
        fail("overwrite=True with init_from=resume: one trains anew, the other goes on; give one")
    if S["overwrite"] and same_start(S["init_from"], os.path.join(S["out_dir"], "ckpt.pt")):
        fail(f"overwrite=True with init_from={S['init_from']}: that is the checkpoint overwrite "
             f"removes; copy it elsewhere first")
    if S["wandb_log"]:  # before any long work
        try:
            import wandb  # noqa: F401
        except ImportError:
            fail("wandb_log=True: wandb is not installed (pip install wandb)")

    # -----------------------------------------------------------------------------
    # processes and devices
    ddp = int(os.environ.get("RANK", -1)) != -1
    device = configurator.resolve_device("train.py", device)
    if ddp:
        from torch.distributed import (ReduceOp, all_reduce, barrier, destroy_process_group,
                                       init_process_group)
        if backend == "auto":
            backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl" and not device.startswith("cuda"):
            fail(f"backend=nccl joins CUDA processes; on device={device} use gloo (or auto)")
        init_process_group(backend=backend)
        ddp_rank, ddp_local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        ddp_world_size = int(os.environ["WORLD_SIZE"])
        if device.startswith("cuda"):
            device = f"cuda:{ddp_local_rank}"
            torch.cuda.set_device(device)
        else:  # share the cores instead of every process using all of them
            local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", ddp_world_size))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_processes))
        if gradient_accumulation_steps % ddp_world_size:
            fail(f"gradient_accumulation_steps ({gradient_accumulation_steps}) must be a multiple "
                 f"of the number of processes ({ddp_world_size}): it counts the micro-steps of all "
                 f"of them, e.g. --gradient_accumulation_steps={ddp_world_size}")
        gradient_accumulation_steps //= ddp_world_size
    else:
        ddp_rank, ddp_local_rank, ddp_world_size = 0, 0, 1
    master = ddp_rank == 0
    device_type = device.split(":")[0]  # cuda, cpu or mps
    dtype = configurator.resolve_dtype("train.py", dtype, device)
    ptdtype = getattr(torch, dtype)
    ctx = (nullcontext() if dtype == "float32"
           else torch.autocast(device_type=device_type, dtype=ptdtype))
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if not out_dir or (os.path.exists(out_dir) and not os.path.isdir(out_dir)):
        fail(f"out_dir={out_dir!r}: expected a folder (made if missing) for ckpt.pt and log.jsonl")
    if not eval_only:  # checked now, not at the first save after minutes of training
        configurator.check_folder("train.py", f"out_dir={out_dir!r}", out_dir)
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    if os.path.isdir(ckpt_path):
        fail(f"{ckpt_path}: a folder, where train.py keeps its checkpoint file; move it away")
    iter_num = None  # set once the weights are loaded

    old_removed = False  # overwrite=True: whether the old run's checkpoint is gone yet

    def interrupted(signum, frame):  # Ctrl-C: a line, not a traceback (saves are atomic)
        if master:
            again = "the same command" + (" without overwrite=True" if overwrite else "")
            kept = (f"{ckpt_path}, its last save, is kept: {again} resumes it"
                    if os.path.exists(ckpt_path) else "no checkpoint was saved yet")
            if overwrite and not old_removed and os.path.exists(ckpt_path):
                kept = f"{ckpt_path}, the old run's, is untouched (nothing was overwritten yet)"
            when = "before the first iteration" if iter_num is None else f"at iter {iter_num}"
            print(f"\ntrain.py: interrupted {when}; {kept}", file=sys.stderr)
        sys.exit(1)
    signal.signal(signal.SIGINT, interrupted)
    sequences_per_iter = gradient_accumulation_steps * ddp_world_size * batch_size
    if master:
        # the run in one line: with no config file given, these are train.py's defaults
        job = f"evaluating {out_dir}/" if eval_only else f"{max_iters} iterations into {out_dir}/"
        print(f"{model}: {job} on data {data_dir}; device {device}, dtype {dtype}, "
              f"{ddp_world_size} process(es), {sequences_per_iter} sequences per iteration")

    # -----------------------------------------------------------------------------
    # randomness: every iteration draws its batches and dropout masks from seeds derived from
    # (seed, iteration, micro-batch), so a resumed run sees exactly what an uninterrupted one would,
    # and N processes with accumulation k/N see the same micro-batches as 1 process with k.
    # stream 0: training batches; 1: evaluation batches (it: the split's index)
    def data_rng(stream, it, micro):
        return np.random.default_rng([seed, stream, it, micro])

    def seed_torch(it, micro):  # dropout masks: stream 2
        torch.manual_seed(int(np.random.SeedSequence([seed, 2, it, micro]).generate_state(1)[0]))

    # -----------------------------------------------------------------------------
    # data, model, optimizer
    checkpoint = init = None
    if eval_only and init_from == "scratch" and os.path.exists(ckpt_path):
        init_from = "resume"  # evaluate the run there, not fresh weights
    if eval_only and init_from == "scratch":  # fresh weights' losses would pass for a result
        fail(f"eval_only: {ckpt_path} not found, nothing to evaluate (init_from=<a ckpt.pt> "
             f"evaluates another run's weights)")
    rerun = init_from != "resume" and not overwrite and not eval_only and os.path.exists(ckpt_path)
    if rerun:
        check_rerun(S, out_dir, init_from, max_iters, master)  # returns only to resume the run
        init_from = "resume"
    if init_from == "resume":
        try:
            checkpoint = load_checkpoint(ckpt_path, device)
            check_finite(checkpoint, ckpt_path)
        except ValueError as e:
            fail(("evaluating" if eval_only else "resuming") + f": {e}")  # e names the file
        if checkpoint["model_name"] != model:
            fail(f"resuming from {ckpt_path}: it holds a {checkpoint['model_name']} model, not "
                 f"{model}")
        if master and not rerun and not eval_only and not checkpoint["config"].get(
                "always_save_checkpoint", True):  # (a re-run said it in check_rerun)
            print(f"{ckpt_path}: the run {resume_point(checkpoint)}")
        config = M.Config(**checkpoint["model_args"])  # the architecture is the checkpoint's
        # the weights the run started from stay part of what it is (a later start is compared)
        S["init_from"] = checkpoint["config"].get("init_from", "scratch")
        end_iter = checkpoint.get("end_iter", checkpoint["iter_num"])
        if end_iter > checkpoint["iter_num"] and end_iter >= max_iters and not eval_only:
            if master:  # a best-only run that went on to max_iters: resuming would redo its end
                print(f"{ckpt_path}: this run is finished (iter {end_iter}; its best weights, "
                      f"kept, are of iter {checkpoint['iter_num']}), nothing to do")
            sys.exit(0)
        # the other settings are this command's: say which ones the run did not have
        diff = changed_settings(S, checkpoint["config"])
        changed = [k for k in diff if k not in model_keys]
        if eval_only and master:  # nothing resumes: the weights are evaluated as they are
            print(f"evaluating {ckpt_path} (iter {checkpoint['iter_num']}) with this command's "
                  f"batch_size={batch_size} and eval_iters={eval_iters}")
        if changed and master:
            print(("evaluating" if eval_only else "resuming") + " with settings other than the "
                  "run's: " + ", ".join(f"{k}={checkpoint['config'].get(k)!r} -> {S.get(k)!r}"
                                        for k in changed))
        # a model field the run did not set (or did not have yet) had the model file's default
        defaults = model_defaults(model)
        run_value = {k: checkpoint["config"].get(k, defaults.get(k)) for k in model_keys}
        kept = [k for k in diff if k in model_keys]
        if kept and master:
            print(("evaluating" if eval_only else "resuming") + " the run's model as it was; not "
                  "used from this command: " + ", ".join(
                      f"{k}={S.get(k, defaults.get(k))!r} (the run's: {run_value[k]!r})"
                      for k in kept)
                  + ("" if eval_only else " (--overwrite=True trains anew with them)"))
        S.update({k: run_value[k] for k in kept})  # saved as what the run is
    else:
        try:
            config = M.Config(**{k: S[k] for k in model_keys if k in S})
        except ValueError as e:
            fail(e)
        if init_from != "scratch":
            if os.path.isdir(init_from):
                fail(f"init_from={init_from!r}: a folder; name the checkpoint in it (e.g. "
                     f"{os.path.join(init_from, 'ckpt.pt')})")
            if not os.path.isfile(init_from):
                fail(f"init_from={init_from!r}: expected scratch, resume or the path of a ckpt.pt "
                     f"(file not found: the train.py run whose out_dir holds it writes it"
                     f"{writer_hint(init_from)})")
            try:
                init = load_checkpoint(init_from, device)
                check_finite(init, init_from)
            except ValueError as e:
                fail(f"init_from: {e}")
            if init["model_name"] != model:
                fail(f"init_from={init_from}: holds a {init['model_name']} model, not {model}")
    tok = choose_tokenizer(config, data_dir, ckpt_path, checkpoint, init_from, init)
    # saved with every checkpoint
    tok_record = None if tok is None else tokenizers.tokenizer_record(tok)
    # the model file's own checks (settings, data, pretrained parts) end the run in one line
    try:
        # may fill data-derived fields (vocab_size, n_mels, ...)
        data = load_model_data(M, data_dir, config, tok)
        torch.manual_seed(seed)
        raw_model = M.Model(config)  # first, as it checks the sizes a batch is made with
        for split in ("train", "val"):  # a split that cannot give a batch says so now
            M.get_batch(data, split, 1, np.random.default_rng(0))
        # pretrained parts named in the config (*_init)
        if checkpoint is None and hasattr(M, "init_pretrained"):
            M.init_pretrained(raw_model, tok)
    except (ValueError, OSError) as e:
        fail(f"{e.filename}: {e.strerror}" if getattr(e, "filename", None) else e)
    except (AssertionError, ZeroDivisionError) as e:  # a size the model file does not check itself
        fail(f"{model}: these settings do not build a model ({type(e).__name__}: "
             f"{str(e) or 'a size of 0 or one that does not divide'})")
    iter_num, best_val_loss = 0, 1e9
    if checkpoint is not None:
        try:
            load_weights(raw_model, checkpoint["model"], checkpoint["model_args"], data_dir)
        except ValueError as e:
            fail(f"resuming from {ckpt_path}: {e}")
        iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
    elif init is not None:
        learned = init["model_args"].get("codec_id")  # Whisper-GPT: the codes its weights learned
        if learned and learned != getattr(config, "codec_id", learned):
            fail(f"init_from={init_from}: its weights learned the codes of {learned}; {data_dir}'s "
                 f"are codes of {config.codec_id} (prepare the data with --codec_from=<its data>)")
        # the settings of the checkpoint's model that this one has otherwise, the sizes (ints)
        # first: a size is a shape error below; a head count (n_head, *_n_head, pengi's
        # enc_heads) loads without one, into another attention layout, so it is refused here
        differ = sorted((k for k, v in init["model_args"].items()
                         if hasattr(config, k) and getattr(config, k) != v),
                        key=lambda k: (not isinstance(getattr(config, k), int), k))
        def said(keys):
            return ", ".join(f"{k}={init['model_args'][k]!r} there, {getattr(config, k)!r} here"
                             for k in keys[:6])
        heads = [k for k in differ if "head" in k]
        if heads:
            fail(f"init_from={init_from}: another split of heads ({said(heads)}) would read its "
                 f"weights in another layout; give the checkpoint's")
        try:
            missing, unexpected = raw_model.load_state_dict(init["model"], strict=False)
        except RuntimeError as e:  # a tensor of another shape
            fail(f"init_from={init_from}: its weights do not fit this model (settings that differ: "
                 f"{said(differ)}): {' '.join(str(e).split())[:240]}")
        if unexpected:
            # another stage's checkpoint (SALMONN, Pengi): its parts come through *_init settings
            stage, ours = init["model_args"].get("stage"), getattr(config, "stage", None)
            # the parts' paths (pengi's text_init, default "llm", is a mode, not a path)
            inits = [f.name for f in fields(config) if f.name.endswith("_init") and f.default == ""]
            hint = (f" (a checkpoint of stage {stage!r}, this run is stage {ours!r}: another "
                    f"stage's parts come through {', '.join(inits)})"
                    if stage and ours and stage != ours and inits else "")
            fail(f"init_from={init_from}: the checkpoint has weights this model lacks: "
                 f"{unexpected[:5]}...{hint}")
        if master:
            print(f"initialised from {init_from} ({init.get('model_name')}, iter "
                  f"{init.get('iter_num')}); {len(missing)} tensors not in it keep their fresh "
                  f"init")
        del init
    raw_model.to(device)
    n_params = sum(p.numel() for p in raw_model.parameters())
    params = [p for p in raw_model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=learning_rate, betas=(beta1, beta2),
                                  **({"fused": True} if device_type == "cuda" else {}))
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        # the saved state brings the run's settings back: this command's are the ones announced
        for group, wd in zip(optimizer.param_groups, (weight_decay, 0.0)):
            group["weight_decay"], group["betas"] = wd, (beta1, beta2)
        if "scaler" in checkpoint and dtype == "float16":
            scaler.load_state_dict(checkpoint["scaler"])
    checkpoint = None  # free its tensors
    if master:
        print(f"{model}: {n_params / 1e6:.2f}M parameters, {n_trainable / 1e6:.2f}M trainable "
              f"({sum(p.numel() for p in decay) / 1e6:.2f}M with weight decay)")
    train_model = eval_model = torch.compile(raw_model) if compile else raw_model
    if ddp:  # (evaluation, on the master only, uses the unwrapped model: no collectives there)
        from torch.nn.parallel import DistributedDataParallel as DDP
        train_model = DDP(train_model,
                          device_ids=[ddp_local_rank] if device_type == "cuda" else None,
                          find_unused_parameters=ddp_find_unused_parameters)

    def to_device(batch):
        if device_type == "cuda":
            return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
        return {k: v.to(device) for k, v in batch.items()}

    @torch.no_grad()
    def estimate_loss():
        """Mean loss over eval_iters batches per split; the same batches at every evaluation."""
        out = {}
        eval_model.eval()
        for i, split in enumerate(("train", "val")):
            rng = data_rng(1, i, 0)
            losses = []
            for _ in range(eval_iters):
                with ctx:
                    _, loss = eval_model(**to_device(M.get_batch(data, split, batch_size, rng)))
                losses.append(loss.item())
            out[split] = float(np.mean(losses))
        eval_model.train()
        return out

    decay_end = lr_decay_iters or max_iters
    # a short trial run: iterations 0 .. max_iters - 1 all warm up (the last at learning_rate x
    # max_iters / (warmup_iters + 1))
    if master and decay_lr and not eval_only and 0 < max_iters <= warmup_iters:
        print(f"note: max_iters={max_iters} ends inside the warmup (warmup_iters={warmup_iters}): "
              f"the learning rate stays under learning_rate={learning_rate} and does not decay")

    def get_lr(it):
        if it < warmup_iters:
            return learning_rate * (it + 1) / (warmup_iters + 1)
        if it >= decay_end:
            return min_lr
        ratio = (it - warmup_iters) / (decay_end - warmup_iters)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)

    def save_checkpoint():
        ckpt = {"model": raw_model.state_dict(), "model_name": model, "model_args": asdict(config),
                "optimizer": optimizer.state_dict(), "iter_num": iter_num,
                "best_val_loss": best_val_loss, "config": dict(S)}
        if tok_record is not None:
            ckpt["tokenizer"] = tok_record
        if dtype == "float16":
            ckpt["scaler"] = scaler.state_dict()
        save_or_stop(ckpt, ckpt_path)
        print(f"saved {ckpt_path} (iter {iter_num})")

    def eval_due(it):  # the iterations that evaluate (and may save)
        return it % eval_interval == 0 or it == max_iters

    log_path = os.path.join(out_dir, "log.jsonl")
    if master and not eval_only:
        # made once data and model have loaded: bad input leaves no empty out_dir behind
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as e:  # check_folder's access test passed, yet the folder cannot be made
            fail(f"out_dir={out_dir}: cannot be made ({e.strerror})")
        # one writer per folder, held until this process ends: two runs there would write over
        # each other's checkpoint and mix their logs
        try:
            out_dir_lock = os.open(out_dir, os.O_RDONLY)
            fcntl.flock(out_dir_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fail(f"out_dir={out_dir}: another train.py is writing there; wait for it to end, or "
                 f"name another out_dir")
        except OSError as e:  # a filesystem without flock (NFS, Lustre), an unreadable folder
            print(f"note: out_dir={out_dir} cannot be locked ({e.strerror}): a second train.py "
                  f"there would not be refused")
        if overwrite and init_from != "resume" and os.path.exists(ckpt_path):
            os.remove(ckpt_path)  # with its log (below): the run there is gone, not half of it
        old_removed = True
        # the log holds this run only, each iteration once: a resumed run keeps the records up to
        # its checkpoint, less the checkpoint's own eval when the loop evaluates there again
        kept, eval_again = [], eval_due(iter_num)
        if iter_num > 0 and os.path.exists(log_path):
            with open(log_path) as f:
                for line in f:
                    try:
                        r = json.loads(line)
                    except ValueError:  # a line cut by a crash
                        continue
                    if not isinstance(r, dict) or not isinstance(r.get("iter"), int):
                        continue  # not a record of train.py's (an edit by hand)
                    if r["iter"] < iter_num or (r["iter"] == iter_num
                                                and not ("val_loss" in r and eval_again)):
                        kept.append(r)
        try:
            with configurator.written_whole(log_path) as tmp, open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
        except OSError as e:
            write_failed(log_path, e)

    def log(record):
        try:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            write_failed(log_path, e)
        if wandb_log:
            wandb.log(record)

    if wandb_log and master:
        import wandb
        wandb.init(project=wandb_project, name=wandb_run_name, config=S)

    # MFU: ~6 flops per trainable and ~4 per frozen parameter per target token, attention left out
    # (a lower bound for SALMONN and Pengi, whose LLM reads other tokens too; docs/training.md)
    flops_per_token = 6 * n_trainable + 4 * (n_params - n_trainable)
    peak = peak_flops
    if device_type == "cuda" and not peak:
        name = torch.cuda.get_device_name(device)
        peak = next((f for k, f in (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12),
                                    ("A100", 312e12)) if k in name), 0.0)

    def fmt_time(s):
        s = int(s)
        return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"

    def stop_non_finite(what):
        """A NaN or inf loss: stop before anything is saved over the last good checkpoint."""
        global train_model
        if master:
            kept = (f"{ckpt_path}, the last save, is kept" if os.path.exists(ckpt_path)
                    else "no checkpoint written")
            hint = ("" if eval_only else " Try a lower learning_rate, grad_clip, or "
                    "dtype=float32/bfloat16.")
            print(f"train.py: {what}: stopping ({kept}).{hint}", file=sys.stderr)
        if ddp:  # every process stops here (teardown as at the end)
            del train_model
            gc.collect()
            destroy_process_group()
        sys.exit(1)

    # -----------------------------------------------------------------------------
    # training loop
    start_iter, t_start = iter_num, time.time()
    # best-only saving from another run's weights: they are the best so far until beaten, so the
    # first eval saves them (else a run that never beats them would end without a checkpoint)
    save_start = init_from not in ("scratch", "resume") and not always_save_checkpoint
    t_log, tokens_log, iters_log = time.time(), 0, 0
    diverged = False  # a NaN or inf evaluation loss (the master's)

    while True:
        lr = get_lr(iter_num) if decay_lr else learning_rate
        for group in optimizer.param_groups:
            group["lr"] = lr
        if master and (eval_due(iter_num) or eval_only):
            t_eval = time.time()
            losses = estimate_loss()
            print(f"step {iter_num}: train loss {losses['train']:.4f}, "
                  f"val loss {losses['val']:.4f}")
            diverged = not all(map(math.isfinite, losses.values()))  # nothing saved then
            if not eval_only:  # the log holds the run's own records
                log({"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"]})
            # the best so far, among weights that may be saved (not a scratch run's untrained
            # start); a resumed run's start is its checkpoint, already saved: its loss counts
            may_save = iter_num > start_iter or save_start
            improved = False
            if may_save or init_from == "resume":
                improved = losses["val"] < best_val_loss
                best_val_loss = min(best_val_loss, losses["val"])
            if may_save and (improved or always_save_checkpoint) and not eval_only and not diverged:
                save_checkpoint()
            t_log += time.time() - t_eval  # the speed on the next log line is training's alone
        if ddp and (eval_due(iter_num) or eval_only):  # the master's verdict, to every process
            verdict = torch.tensor(float(diverged), device=device)
            all_reduce(verdict, op=ReduceOp.SUM)
            diverged = verdict.item() > 0
        if diverged:
            stop_non_finite(f"the evaluation's loss is not finite at iter {iter_num}")
        if eval_only or iter_num >= max_iters:
            break

        loss_sum = torch.zeros((), device=device)
        for micro_step in range(gradient_accumulation_steps):
            if ddp:  # sync gradients only on the last micro-step
                last = micro_step == gradient_accumulation_steps - 1
                train_model.require_backward_grad_sync = last
            micro = ddp_rank * gradient_accumulation_steps + micro_step  # index over all processes
            rng = data_rng(0, iter_num, micro)
            seed_torch(iter_num, micro)
            batch = M.get_batch(data, "train", batch_size, rng)
            # target tokens, or clips for a tagging batch (SALMONN's beats), counted before the copy
            # to the device: no wait for the GPU
            tokens_log += int((batch["targets"] != -1).sum()) if "targets" in batch else batch_size
            batch = to_device(batch)
            with ctx:
                _, loss = train_model(**batch)
                loss = loss / gradient_accumulation_steps
            loss_sum += loss.detach().float()
            scaler.scale(loss).backward()
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if ddp:
            all_reduce(loss_sum, op=ReduceOp.SUM)  # gloo has no AVG
            loss_sum /= ddp_world_size
        lossf = loss_sum.item()
        if not math.isfinite(lossf):
            stop_non_finite(f"loss is {lossf} at iter {iter_num}")
        iter_num += 1
        iters_log += 1
        if master and (iter_num % log_interval == 0 or iter_num == max_iters):
            now = time.time()
            dt = (now - t_log) / iters_log
            tok_s = tokens_log * ddp_world_size / (now - t_log)
            eta = (max_iters - iter_num) * (now - t_start) / (iter_num - start_iter)
            mfu = (f" | mfu {100 * flops_per_token * tok_s / (peak * ddp_world_size):.1f}%" if peak
                   else "")
            print(f"iter {iter_num}/{max_iters} | loss {lossf:.4f} | lr {lr:.2e} | {dt * 1000:.1f} "
                  f"ms/iter | {tok_s / 1e3:.1f}k tok/s{mfu} | eta {fmt_time(eta)}", flush=True)
            log({"iter": iter_num, "loss": lossf, "lr": lr, "ms_per_iter": dt * 1000,
                 "tok_per_s": tok_s})
            t_log, tokens_log, iters_log = now, 0, 0

    if master and not eval_only and not always_save_checkpoint and os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path)  # the best weights: note that the run went on to the end
        if ckpt["iter_num"] < iter_num:
            # where the run ended, and the settings it ended with (a re-run of them is finished)
            ckpt["end_iter"], ckpt["config"] = iter_num, dict(S)
            save_or_stop(ckpt, ckpt_path)
    if master and eval_only:
        print("done: evaluated " + (f"{ckpt_path} (iter {iter_num})" if init_from == "resume"
                                    else f"the weights of init_from={init_from}"))
    elif master:
        print(f"done: {iter_num} iterations in {fmt_time(time.time() - t_start)}"
              + (f", best val loss {best_val_loss:.4f}" if best_val_loss < 1e9 else ""))
    if ddp:
        barrier()  # the master may still be evaluating or saving (gloo aborts otherwise)
        # the DDP wrapper holds the process group: drop it first, so that destroy_process_group,
        # not the interpreter's exit (an abort now and then), stops gloo's threads
        del train_model
        gc.collect()
        destroy_process_group()
