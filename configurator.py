"""
The one settings parser of train.py, sample.py, eval.py and the Whisper-GPT table and benchmark
scripts: nanoGPT's configurator, with types.

A script's settings are its module-level int / float / bool / str globals (its defaults). Config
files (Python files of assignments, where a script takes them) and then --key=value override them,
in the order given. Every value must have its default's type. An int is accepted for a float, and
--flag alone means --flag=True for a bool. An unknown key is an error that names where it came from
and suggests the closest known keys. A script may pass unknown keys on instead: sample.py and
eval.py check them against the model file's SAMPLE_OPTS / EVAL_OPTS, whisper_gpt_table.py gives
them to train.py.

    settings, unknown, args = parse(script, argv, globals())  # a script without config files
    entries, _ = gather(argv, config_files=True)              # train.py: what was given, in order
    settings, unknown = resolve(entries, types)               # typed values; unknown keys, raw text
"""

import ast
import difflib
import importlib
import inspect
import os
import re
import signal
import sys
import traceback
from contextlib import contextmanager

TYPES = (int, float, bool, str)

class SettingsError(ValueError):
    pass

def defaults(namespace):
    """The settings of a script: its module-level globals of a plain type, not starting with _ and
    not in capitals (constants, such as an imported SAMPLE_RATE)."""
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and not k.isupper() and type(v) in TYPES}

def read_config_file(path):
    """{key: value} of the plain-typed assignments in a config file."""
    if os.path.isdir(path):
        raise SettingsError(f"config file {path}: a folder; name a config file in it")
    if not os.path.isfile(path):
        raise SettingsError(f"config file {path} not found")
    ns = {}
    try:
        # one namespace, as a module has: a comprehension or lambda sees the settings above it
        with open(path) as f:
            exec(compile(f.read(), path, "exec"), ns)  # (errors name the file and its line)
    except (Exception, SystemExit) as e:  # sys.exit() in it would end the script without a word
        # the line of the file that raised (a SyntaxError names its own)
        line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__))
                     if f.filename == path), None)
        at = f" (line {line})" if line and not isinstance(e, SyntaxError) else ""
        raise SettingsError(f"config file {path} does not run: {type(e).__name__}: {e}{at}")
    out = {}
    for key, value in ns.items():
        if key.startswith("_") or type(value).__name__ == "module":
            continue
        if type(value) not in TYPES:
            raise SettingsError(f"{path}: {key} = {value!r}: settings must be int, float, bool or "
                                f"str")
        out[key] = value
    return out

def gather(argv, config_files=False, positional=False, run_hint=False, bools=()):
    """argv -> ([(key, value, raw, where)], positional args). raw is the --key=value text (None for
    a config file's value, which is already typed). A bare argument is a config file (config_files)
    or is returned as positional (positional); otherwise it is an error, which with run_hint names
    --out_dir=<it> for a run's folder. bools: the settings that are True/False, after which a bare
    argument is not their value. -h / --help anywhere prints the script's help (print_help) and
    exits."""
    if any(arg in ("-h", "--help") for arg in argv):
        print_help(argv if config_files else None)
    entries, rest = [], []
    for i, arg in enumerate(argv):
        # --key value, as other parsers take it. After a bare --flag only a config file may stand,
        # or, where runs are positional, a run: any argument after a setting known to be True/False,
        # else a checkpoint, a folder holding one, or a path not there (a missing run is named
        # later). Anything else is the flag's value
        after = argv[i - 1] if i else ""
        if not arg.startswith("--") and after.startswith("--") and "=" not in after:
            may_stand = ((config_files and arg.endswith(".py"))
                         or (positional and (after[2:] in bools or os.path.isfile(arg)
                                             or os.path.isfile(os.path.join(arg, "ckpt.pt"))
                                             or (os.sep in arg and not os.path.exists(arg)))))
            if not may_stand:
                raise SettingsError(f"{after} {arg}: write {after}={arg}")
        if arg.startswith("--"):
            key, eq, raw = arg[2:].partition("=")
            if not key:
                raise SettingsError(f"{arg}: expected --key=value")
            entries.append((key, None, raw if eq else None, arg))
        elif config_files:
            entries += [(k, v, None, arg) for k, v in read_config_file(arg).items()]
        elif positional:
            rest.append(arg)
        else:
            # a run's folder, as eval.py takes it, to a script whose out_dir names one (sample.py)
            run = run_hint and os.path.isfile(os.path.join(arg, "ckpt.pt"))
            raise SettingsError(f"{arg}: expected --key=value (--help lists the settings)" +
                                (f"; a run's folder is --out_dir={arg}" if run else ""))
    return entries, rest

def print_help(train_argv=None):
    """The running script's docstring and its settings block (the lines between its first two
    "# ---" rulers: each setting with its default and a comment), then exit. For train.py
    (train_argv), also the Config of the model its arguments name (--model=, or a config file's
    model = "..."; whisper_gpt by default)."""
    # `--help | head`: end quietly when the reader closes the pipe, as Unix tools do
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    main = sys.modules["__main__"]
    path = getattr(main, "__file__", "") or ""
    name = os.path.basename(path) or "the script"
    print((main.__doc__ or "").strip())
    print("\nSettings, as --key=value" + (" (also the fields of the model file's Config)"
                                          if name == "train.py" else "") + ":\n")
    try:
        with open(path) as f:
            lines = f.read().splitlines()
        rulers = [i for i, line in enumerate(lines) if line.startswith("# ---")][:2]
        block = "\n".join(lines[rulers[0] + 1:rulers[1]])
    except (OSError, IndexError):
        block = f"(in the block at the top of {name})"
    print(block)
    opts_name = {"sample.py": "SAMPLE_OPTS", "eval.py": "EVAL_OPTS"}.get(name)
    if opts_name:  # the options passed on, per model file, with their defaults
        print(f"\nThe model file's options, as --key=value ({opts_name}, with the defaults):")
        own = defaults(vars(main))  # the script's own settings (its --seed) are not passed on
        for model in ("whisper_gpt", "salmonn", "pengi"):
            opts = getattr(import_model(name, model), opts_name)
            print(f"  {model}: " + ", ".join(f"{k}={v!r}" if v is not None else f"{k} (unset)"
                                             for k, v in opts.items() if k not in own))
    if train_argv is not None:
        model = "whisper_gpt"
        for arg in train_argv:  # the last one named wins, as when the settings are merged
            if arg.startswith("--model="):
                model = arg.split("=", 1)[1]
            elif not arg.startswith("--"):  # a config file, run as train.py runs it
                try:
                    model = read_config_file(arg).get("model", model)
                except SettingsError:
                    pass  # train.py names what is wrong with it
        module = None
        if re.fullmatch(r"\w+", str(model)) and os.path.isfile(
                os.path.join(os.path.dirname(path), f"{model}.py")):
            module = import_model(name, model)
        if getattr(module, "Config", None) is None:
            print(f"\n(model {model!r}: not one of the model files whisper_gpt, salmonn, pengi)")
        else:
            source = inspect.getsource(module.Config)
            print(f"\nThe model's settings, as --key=value (the fields of {model}.py's Config):\n")
            print(source.rstrip())
    sys.exit(0)

def literal(raw):
    """--key=raw read as a Python literal where it is one (3, 0.5, True, [1, 2]), else as the string
    itself."""
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):  # {[1]: 2}: TypeError
        return raw

def boolean(raw, error):
    """True / False from --key=raw text (true, false, 1, 0, any case), else a SettingsError."""
    if raw.lower() in ("true", "1"):
        return True
    if raw.lower() in ("false", "0"):
        return False
    raise SettingsError(error)

def typed(key, value, raw, expected, where):
    """The value of a setting of type expected: from the --key=value text raw, or a config file's
    value."""
    if raw is None and value is None:                # --flag alone
        if expected is bool:
            return True
        raise SettingsError(f"{where}: expected --key=value")
    if raw is not None:
        if expected is bool:
            return boolean(raw, f"{where}: {key} must be True or False")
        if expected is str:
            return raw                               # --wandb_run_name=123 is the string "123"
        value = literal(raw)
    if expected is float and type(value) is int:
        return float(value)
    if type(value) is not expected:
        raise SettingsError(f"{where}: {key} must be {expected.__name__}, got "
                            f"{type(value).__name__} {value!r}")
    return value

def unknown_key(key, where, types, what):
    close = difflib.get_close_matches(key, list(types), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return SettingsError(f"{where}: unknown setting {key!r}: not {what}{hint}")

def resolve(entries, types, pass_unknown=False, what="a setting of this script"):
    """Typed values of the gathered entries (the later wins). types: {key: type}. Unknown keys are
    an error, or with pass_unknown are returned as {key: raw text} (a config file's value as its
    repr; None for a bare --flag, which only a bool takes)."""
    settings, unknown = {}, {}
    for key, value, raw, where in entries:
        if key in types:
            settings[key] = typed(key, value, raw, types[key], where)
        elif pass_unknown:
            unknown[key] = raw if raw is not None else (None if value is None else repr(value))
        else:
            raise unknown_key(key, where, types, what)
    return settings, unknown

def fail(script, error):
    print(f"{script}: {error}", file=sys.stderr)
    sys.exit(2)

def import_model(script, name):
    """The model file `name`, imported. Importing it imports fused_attention, which checks its
    FUSED_ATTENTION* variables (docs/fused_attention.md): a mistyped one stops the script in one
    line, not a traceback."""
    try:
        return importlib.import_module(name)
    except ValueError as e:
        fail(script, e)

def parse(script, argv, namespace, pass_unknown=False, positional=False):
    """The whole job for a script without config files: defaults from namespace, overridden by argv.
    Returns (settings, unknown {key: raw}, positional args); a bad argument ends the script with the
    message."""
    own = defaults(namespace)
    types = {k: type(v) for k, v in own.items()}
    try:
        entries, rest = gather(argv, positional=positional, run_hint="out_dir" in types,
                               bools={k for k, t in types.items() if t is bool})
        settings, unknown = resolve(entries, types, pass_unknown, what=f"a setting of {script}")
    except SettingsError as e:
        fail(script, e)
    return {**own, **settings}, unknown, rest

# -----------------------------------------------------------------------------
# after parsing: device, dtype, output folders, and the options passed on to a model file

def resolve_device(script, device):
    """--device: auto is cuda where there is one, else cpu; any other must be a device torch knows
    and this machine has."""
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        fail(script, f"device={device!r}: not a device torch knows (auto, cpu, cuda, cuda:1, mps)")
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": torch.backends.mps.is_available()}
    if not available.get(dev.type, False):
        fail(script, f"device={device!r}: this machine has no {dev.type} device torch can use "
                     f"(device=cpu or auto)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        fail(script, f"device={device!r}: this machine has {torch.cuda.device_count()} GPU(s), "
                     f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device

def resolve_dtype(script, dtype, device):
    """--dtype: auto is bfloat16 on a GPU that has it, float16 on an older one, float32 elsewhere.
    Returns the name (torch's: getattr(torch, name) is the dtype)."""
    import torch
    if dtype == "auto":
        if not device.startswith("cuda"):
            return "float32"
        # bfloat16 in hardware from sm_80 on; torch.cuda.is_bf16_supported() also says yes to an
        # older GPU that only emulates it, slowly (a T4, a V100)
        major = torch.cuda.get_device_capability(torch.device(device))[0]
        return "bfloat16" if major >= 8 else "float16"
    if dtype not in ("float32", "bfloat16", "float16"):
        fail(script, f"dtype={dtype!r}: expected auto, float32, bfloat16 or float16")
    return dtype

def check_folder(script, what, folder):
    """A one-line failure naming `what` unless folder is writable or can be made (its nearest
    existing parent is a writable folder). Called before long work that would fail at its first
    write."""
    p = os.path.abspath(folder)
    while not os.path.exists(p):  # the folders makedirs would make
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        fail(script, f"{what}: {p} is a file, not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        fail(script, f"{what}: {p} is not writable")

def check_out_file(script, out, title):
    """The --out file of a script that writes a report (markdown whose first line is title) after
    long work: a one-line failure now if it names a folder, sits in a folder that does not exist,
    or is a file the script did not write (a checkpoint, a README), which it must not replace."""
    folder = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out) or out.endswith(os.sep):
        fail(script, f"--out={out}: a folder; name the markdown file to write")
    if not os.path.isdir(folder):
        fail(script, f"--out={out}: {folder} " + ("is a file, not a folder"
                                                  if os.path.exists(folder) else "does not exist"))
    check_own_report(script, out, title)

def check_own_report(script, out, title):
    """A one-line failure unless out is new, empty or a report of the script (title its first
    line)."""
    if os.path.isfile(out) and os.path.getsize(out):
        with open(out, "rb") as f:
            first = f.readline().decode("utf-8", "replace").rstrip("\r\n")
        if first != title:
            fail(script, f"--out={out}: the file exists and is not a report of {script} (its "
                         f"first line is not {title!r}); name a new file")

@contextmanager
def written_whole(path):
    """The scripts' way to write a file: to path.tmp, then renamed over path (atomic: a stop
    leaves the old file or the new one). A write that fails (a full disk) leaves path as it was
    and no part beside it, which would keep a full disk full."""
    tmp = path + ".tmp"
    try:
        yield tmp
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)

def write_report(script, out, lines):
    """check_out_file's report, lines[0] its title, written whole (written_whole). The scripts
    print it first, so a failed write loses nothing."""
    try:
        with written_whole(out) as tmp, open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")
    except OSError as e:
        fail(script, f"--out={out}: cannot be written ({e}); the table is printed above")
    print(f"wrote {out}")

def option_values(raw_opts, opt_defaults):
    """The --key=raw options of a model file's sample() / evaluate(), typed by their defaults in
    SAMPLE_OPTS / EVAL_OPTS. A text option takes the text itself, a bool True or False, an int a
    whole number, a float or a None default any number. A value that does not fit is a
    SettingsError that names the option. Keys without a default are the caller's to refuse."""
    out = {}
    for key, raw in raw_opts.items():
        default = opt_defaults.get(key)
        if raw is None:  # a bare --flag
            if not isinstance(default, bool):
                raise SettingsError(f"--{key}: expected --key=value")
            out[key] = True
            continue
        if isinstance(default, str):
            out[key] = raw
            continue
        if isinstance(default, bool):  # as train.py's bool settings
            out[key] = boolean(raw, f"--{key}={raw}: expected True or False")
            continue
        value = literal(raw)
        if isinstance(default, int):
            ok, want = isinstance(value, int) and not isinstance(value, bool), "a whole number"
        else:
            ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        if not ok:
            raise SettingsError(f"--{key}={raw}: expected {want}")
        out[key] = float(value) if isinstance(default, float) else value
    return out

def misspelt(keys, names):
    """"--key (did you mean --name?)" for each of keys close to one of names, comma-joined; "" when
    none is."""
    hints = []
    for key in keys:
        close = difflib.get_close_matches(key, list(names), n=2)
        if close:
            hints.append(f"--{key} (did you mean {' or '.join('--' + c for c in close)}?)")
    return ", ".join(hints)

def model_options(raw_opts, opt_defaults, script, func, script_settings=()):
    """The --key=value options a script passes on to a model file's func (e.g. "pengi.sample"),
    typed by option_values. A key func does not take is a SettingsError that lists func's options
    and the closest of them or of script_settings."""
    unknown = sorted(set(raw_opts) - set(opt_defaults))
    if unknown:
        hint = misspelt(unknown, [*opt_defaults, *script_settings])
        # an option of func's that the script has as its own setting is not reached from here
        reached = sorted(k for k in opt_defaults if k not in script_settings)
        raise SettingsError(f"unknown setting(s) {', '.join('--' + k for k in unknown)}: not a "
                            f"setting of {script} nor an option of {func} "
                            f"({', '.join(reached)})" + (f"; {hint}" if hint else ""))
    return option_values(raw_opts, opt_defaults)
