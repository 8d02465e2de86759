"""
Compare trained checkpoints on the paper-style metrics of their model files, in one table.

    python eval.py out/whisper-gpt-s-cpu out/whisper-gpt-l-cpu out/whisper-gpt-hybrid-cpu
    python eval.py out/whisper-gpt-quick/ckpt.pt --split=train --max_windows=50

Arguments: checkpoint files, or out_dirs that hold a ckpt.pt. eval.py's own settings are below.
Every other --key=value goes to the model file's evaluate() (e.g. --batch_size=32), typed by its
default in EVAL_OPTS. Every run is checked for its options (names, types, ranges: the model file's
eval_options) before any data loads.
The metrics are whatever evaluate() returns. For Whisper-GPT: next coarse-token NLL (nats/token),
accuracy and perplexity.
"""

import importlib
import json as jsonlib
import os
import statistics
import sys
import time
from dataclasses import asdict

import configurator
import tokenizer as tokenizers
from train import changed_settings, load_checkpoint, load_model_data, load_weights

# -----------------------------------------------------------------------------
split = "val"        # train | val
data_dir = ""        # default: each checkpoint's own
kinds = ""           # Whisper-GPT's clip kinds (e.g. music, or all); default: each checkpoint's own
device = "auto"
json = ""            # also write the results to this file
mean = False         # add the mean and standard deviation over the runs (seeds of one recipe)
# -----------------------------------------------------------------------------

def fail(msg):
    configurator.fail("eval.py", msg)

def checkpoint_paths(args):
    """The ckpt.pt files that the arguments name (a file, or an out_dir holding one), each once: a
    run named twice would count twice in --mean."""
    paths, seen = [], {}
    for a in args:
        p = os.path.join(a, "ckpt.pt") if os.path.isdir(a) else a
        if not os.path.isfile(p):
            fail(f"{p}: checkpoint not found")
        real = os.path.realpath(p)
        if real in seen:
            print(f"eval.py: {p} is {seen[real]} again; evaluated once", file=sys.stderr)
            continue
        seen[real] = p
        paths.append(p)
    if not paths:
        fail("give one or more checkpoints (ckpt.pt files or out_dirs)")
    return paths

def evaluate_error(path, M, e):
    """The line for a ValueError of M.evaluate: the model files' messages mostly name themselves."""
    msg = str(e)
    return f"{path}: " + (msg if msg.startswith(M.__name__) else f"{M.__name__}.evaluate: {msg}")

def check_runs(paths, opts):
    """Before any work, check that every checkpoint loads and takes the evaluate() options and
    --kinds given. With --mean, check that all are of one model and stage and differ only in the
    seed: a mean is over seeds of one recipe."""
    model_stages, first_path, first_config = set(), None, None
    for path in paths:
        try:
            ck = load_checkpoint(path, mmap=True)  # its settings: the weights are read later
        except ValueError as e:
            fail(e)
        M = configurator.import_model("eval.py", ck["model_name"])
        try:
            typed = configurator.model_options(opts, M.EVAL_OPTS, "eval.py",
                                               f"{M.__name__}.evaluate",
                                               script_settings=configurator.defaults(globals()))
        except ValueError as e:
            fail(f"{path}: {e}")
        try:  # out of range (--beam=0): refused now, not after the data loads
            M.eval_options(typed)
        except ValueError as e:
            fail(evaluate_error(path, M, e))
        if kinds and "kinds" not in ck["model_args"]:
            fail(f"--kinds={kinds}: {path} is a {ck['model_name']} model, which has no "
                 f"clip-kind subsets")
        model_stages.add((ck["model_name"], ck["model_args"].get("stage")))
        if mean and first_path is not None and len(model_stages) == 1:
            changed = changed_settings(ck["config"], first_config, skip=("seed",))
            # where each run started (its own clap checkpoint per seed, say) may differ; whether
            # from scratch or from weights may not
            if ((ck["config"].get("init_from", "scratch") == "scratch")
                    != (first_config.get("init_from", "scratch") == "scratch")):
                changed.append("init_from (one from scratch, one from weights)")
            if changed:
                fail(f"--mean averages seeds of one recipe: {first_path} and {path} differ in "
                     f"{', '.join(changed[:5])}")
        if first_path is None:
            first_path, first_config = path, ck["config"]
        del ck
    if mean and len(model_stages) > 1:
        fail(f"--mean: the runs are of {len(model_stages)} models or stages "
             f"({', '.join(sorted(f'{m} {s}' if s else m for m, s in model_stages))}); a mean is "
             f"over runs of one")

def evaluate_checkpoint(path, opts):
    """One row of the table: the run's name, size, iterations and data, then its model file's
    evaluate() metrics."""
    try:
        ck = load_checkpoint(path)
    except ValueError as e:
        fail(e)
    M = importlib.import_module(ck["model_name"])
    config = M.Config(**ck["model_args"])
    if kinds:
        config.kinds = "" if kinds == "all" else kinds
    ddir = data_dir or ck["config"]["data_dir"]
    if getattr(config, "asr_data_dir", ""):  # more training clips (SALMONN): evaluation reads ddir
        config.asr_data_dir = ""
    try:
        tok = tokenizers.checkpoint_tokenizer(ck, config, ddir, path)   # None for whisper_gpt
    except (ValueError, OSError, RuntimeError) as e:
        fail(f"{path}: tokenizer: {e}")
    # before load_data sets its fields: load_weights names those the data changed
    as_built = asdict(config)
    try:
        data = load_model_data(M, ddir, config, tok)
    except (ValueError, OSError) as e:
        fail(f"{path}: data: {e}")
    try:
        model = M.Model(config)
    except (ValueError, OSError) as e:
        fail(f"{path}: model: {e}")
    try:
        load_weights(model, ck["model"], as_built, ddir)
    except ValueError as e:
        fail(f"{path}: {e}")
    model.eval().to(device)
    t0 = time.time()
    try:  # (evaluate() itself runs without gradients)
        metrics = M.evaluate(model, data, tok, split,
                             **configurator.option_values(opts, M.EVAL_OPTS))
    except ValueError as e:  # an option of evaluate() that the data refuses
        fail(evaluate_error(path, M, e))
    name = os.path.basename(os.path.dirname(os.path.abspath(path)))
    row = {"run": name, "model": ck["model_name"],
           "params": sum(p.numel() for p in model.parameters()), "iters": ck["iter_num"],
           "data": ddir, **({"kinds": config.kinds or "all"} if hasattr(config, "kinds") else {}),
           **metrics}
    print(f"{name}: evaluated on {ddir} {split} in {time.time() - t0:.1f} s", file=sys.stderr)
    return row

def fmt_cell(k, v):
    """A metric's table cell: Whisper-GPT's "accuracy" in %, other floats to 4 decimals (1 from
    100 on), "-" for none."""
    if v is None:
        return "-"
    if k == "accuracy":
        return f"{100 * v:.2f}%"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)

def metric_keys(rows):
    """The metrics of any run, in the order they first appear."""
    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys
                 and k not in ("run", "model", "params", "iters", "data")]
    return keys

def mean_rows(rows):
    """With --mean and two runs or more: a mean row and a standard deviation row. Each numeric
    metric is taken over the runs that have it, where two or more do."""
    if not (mean and len(rows) > 1):
        return []
    vals = {k: [r[k] for r in rows if isinstance(r.get(k), (int, float))]
            for k in metric_keys(rows)}
    out = []
    for name, f in (("mean", statistics.mean), ("std", statistics.stdev)):
        out.append({"run": f"{name} ({len(rows)} runs)",
                    **{k: float(f(v)) for k, v in vals.items() if len(v) > 1}})
    return out

def print_table(rows, with_mean=True):
    """Markdown: one row per run, a column per metric of any run ("-" where a run has none); with
    --mean (and with_mean), the mean and standard deviation rows."""
    keys = metric_keys(rows)
    print("| run | params | iters | " + " | ".join(keys) + " |")
    print("|---|---|---|" + "---|" * len(keys))
    for r in rows:
        print(f"| {r['run']} | {r['params'] / 1e6:.2f}M | {r['iters']} | "
              + " | ".join(fmt_cell(k, r.get(k)) for k in keys) + " |")
    for r in mean_rows(rows) if with_mean else []:
        print(f"| {r['run']} | | | " + " | ".join(fmt_cell(k, r.get(k)) for k in keys) + " |")

def is_results_file(path):
    """Whether path is empty or holds what write_json writes (a list of rows, each with a "run"):
    the only files --json may replace."""
    try:
        with open(path, "rb") as f:
            first = f.read(64).lstrip()[:1]
            if first != b"[":  # a checkpoint, a config, meta.json: not ours
                return not first
            f.seek(0)
            rows = jsonlib.load(f)
        return all(isinstance(r, dict) and "run" in r for r in rows)
    except (ValueError, OSError):  # UnicodeDecodeError is a ValueError
        return False

def write_json(rows):
    """--json: the rows (then, with --mean, the mean and standard deviation rows), written whole
    then renamed (never a half-written file)."""
    try:
        with configurator.written_whole(json) as tmp, open(tmp, "w") as f:
            jsonlib.dump(rows + mean_rows(rows), f, indent=2)
    except OSError as e:  # a full disk, a folder gone meanwhile: the table above is printed
        fail(f"--json={json}: cannot write it ({e})")

def main(argv):
    global device  # reassigned below, after globals().update has set it
    # opts: the evaluate() options, raw text: each model file's EVAL_OPTS types them
    settings, opts, args = configurator.parse("eval.py", argv, globals(), pass_unknown=True,
                                              positional=True)
    globals().update(settings)
    paths = checkpoint_paths(args)
    if split not in ("train", "val"):
        fail(f"--split={split!r}: expected train or val")
    if mean and len(paths) < 2:
        fail(f"--mean: {len(paths)} run; a mean and a spread need two or more (e.g. one recipe's "
             f"seeds: out/run-s1337 out/run-s1 out/run-s2)")
    if json:  # checked now, not after the evaluations
        folder = os.path.dirname(os.path.abspath(json))
        if not os.path.isdir(folder):
            fail(f"--json={json}: its folder does not exist")
        # a trailing / names a folder too, existing or not (it would fail only after the work)
        if os.path.isdir(json) or json.endswith(os.sep):
            fail(f"--json={json}: a folder; name the file to write")
        if not os.access(folder, os.W_OK):
            fail(f"--json={json}: its folder is not writable")
        if os.path.isfile(json) and not is_results_file(json):
            fail(f"--json={json}: the file exists and is not eval.py's results; name a new file "
                 f"or a results file")
    device = configurator.resolve_device("eval.py", device)
    check_runs(paths, opts)
    rows, t0 = [], time.time()
    for i, path in enumerate(paths):
        if len(paths) > 1:  # the runs one after another: where it is, and how long the rest takes
            left = "" if not i else (f"; ~{(time.time() - t0) / i * (len(paths) - i):.0f} s left "
                                     f"at the pace so far")
            print(f"[{i + 1}/{len(paths)}] {path}{left}", file=sys.stderr)
        try:
            rows.append(evaluate_checkpoint(path, opts))
        # this run stopped (its message is out), or Ctrl-C: the runs done are not lost
        except (SystemExit, KeyboardInterrupt):
            if rows:
                print_table(rows, with_mean=False)
                print(f"eval.py: the table above holds the {len(rows)} run(s) evaluated before "
                      f"{path} stopped (no mean, no --json)", file=sys.stderr)
            raise
    print_table(rows)
    if json:
        write_json(rows)

if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except KeyboardInterrupt:  # Ctrl-C: a line, not a traceback (--json is written at the end)
        sys.exit("\neval.py: interrupted; nothing written")
