"""
Compare trained checkpoints on the paper-style metrics of their model files, in one table.

    python eval.py out/whisper-gpt-s-cpu out/whisper-gpt-l-cpu out/whisper-gpt-hybrid-cpu
    python eval.py out/whisper-gpt-quick/ckpt.pt --split=train --max_windows=50

Arguments: checkpoint files or out_dirs (their ckpt.pt). Settings: --split (val), --data_dir (default:
each checkpoint's own), --kinds (Whisper-GPT: evaluate on the clips of these kinds, e.g. --kinds=music; default:
each checkpoint's own subset), --device, --json=FILE (also write the results), --mean (add the mean and the standard
deviation over the runs, e.g. one recipe's seeds). Every other --key=value goes to
the model file's evaluate() (e.g. --batch_size=32). The metrics are whatever evaluate() returns;
for Whisper-GPT: next coarse-token NLL (nats/token), accuracy and perplexity.
"""

import ast
import importlib
import json
import os
import sys
import time

import torch

split = "val"
data_dir = ""
kinds = None
device = "auto"
json_out = ""
mean = False

def fail(msg):
    print(f"eval.py: {msg}", file=sys.stderr)
    sys.exit(2)

def main(argv):
    global split, data_dir, kinds, device, json_out, mean
    paths, opts = [], {}
    for arg in argv:
        if not arg.startswith("--"):
            paths.append(os.path.join(arg, "ckpt.pt") if os.path.isdir(arg) else arg)
            continue
        if arg == "--mean":
            mean = True
            continue
        if "=" not in arg:
            fail(f"{arg}: expected --key=value")
        key, raw = arg[2:].split("=", 1)
        if key in ("split", "data_dir", "device", "kinds"):
            globals()[key] = raw
        elif key == "json":
            json_out = raw
        else:
            try:
                opts[key] = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                opts[key] = raw
    if not paths:
        fail("give one or more checkpoints (ckpt.pt files or out_dirs)")
    for p in paths:
        if not os.path.isfile(p):
            fail(f"{p}: checkpoint not found")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"

    import prepare
    rows = []
    for path in paths:
        ck = torch.load(path, map_location="cpu", weights_only=True)
        M = importlib.import_module(ck["model_name"])
        config = M.Config(**ck["model_args"])
        if kinds is not None:
            if not hasattr(config, "kinds"):
                fail(f"--kinds={kinds}: {path} is a {ck['model_name']} model, which has no clip-kind subsets")
            config.kinds = kinds
        ddir = data_dir or ck["config"]["data_dir"]
        try:
            tok = prepare.checkpoint_tokenizer(ck, config, ddir, path)   # None for whisper_gpt
        except (ValueError, OSError, RuntimeError) as e:
            fail(f"{path}: tokenizer: {e}")
        try:
            data = M.load_data(ddir, config, tok)
        except (ValueError, OSError) as e:
            fail(f"{path}: data: {e}")
        model = M.Model(config)
        model.load_state_dict(ck["model"])
        model.eval().to(device)
        t0 = time.time()
        with torch.no_grad():
            metrics = M.evaluate(model, data, tok, split, **opts)
        name = os.path.basename(os.path.dirname(os.path.abspath(path)))
        rows.append({"run": name, "model": ck["model_name"], "params": model.get_num_params() if hasattr(model, "get_num_params")
                     else sum(p.numel() for p in model.parameters()), "iters": ck["iter_num"], "data": ddir,
                     **({"kinds": config.kinds or "all"} if hasattr(config, "kinds") else {}), **metrics})
        print(f"{name}: evaluated on {ddir} {split} in {time.time() - t0:.1f} s", file=sys.stderr)
        del model, ck

    keys = []
    for r in rows:
        keys += [k for k in r if k not in keys and k not in ("run", "model", "params", "iters", "data")]

    def fmt(k, v):
        if v is None:
            return "-"
        if k == "accuracy":
            return f"{100 * v:.2f}%"
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
        return str(v)

    print(f"| run | params | iters | " + " | ".join(keys) + " |")
    print("|---|---|---|" + "---|" * len(keys))
    for r in rows:
        print(f"| {r['run']} | {r['params'] / 1e6:.2f}M | {r['iters']} | " + " | ".join(fmt(k, r.get(k)) for k in keys) + " |")
    if mean and len(rows) > 1:
        import statistics
        for name, f in (("mean", statistics.mean), ("std", statistics.stdev)):
            vals = [[r[k] for r in rows if isinstance(r.get(k), (int, float))] for k in keys]
            print(f"| {name} ({len(rows)} runs) | | | " + " | ".join(fmt(k, float(f(v))) if len(v) > 1 else "-"
                                                             for k, v in zip(keys, vals)) + " |")
    if json_out:
        tmp = json_out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(rows, f, indent=2)
        os.replace(tmp, json_out)

if __name__ == "__main__":
    main(sys.argv[1:])
