"""train.py and sample.py: settings checks, exact resume, 2-process DDP (gloo), NaN stop, init_from,
and sample.py's wav output. Tiny Whisper-GPT models on the test corpus; a tiny text model's
checkpoint and its tokenizer."""

import importlib.util
import json
import math
import os
import re
import sys

import numpy as np
import pytest
import soundfile as sf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402  (its training runs only as a script)
import tokenizer
from script_runner import run_script

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--mel_n_layer=1", "--mel_n_head=2",
        "--mel_n_embd=16", "--mel_dim=8", "--block_size=32", "--batch_size=4", "--eval_iters=2",
        "--eval_interval=4", "--log_interval=1", "--warmup_iters=2", "--lr_decay_iters=8",
        "--learning_rate=1e-2", "--min_lr=1e-3",
        "--device=cpu"]  # where there is a GPU too: the tests recompute runs on the CPU, in float32
# tiny models: one thread each is fastest, and fair on a shared box
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

def run(args, check=True, cmd=None):
    p = run_script((cmd or [sys.executable, "train.py"]) + args, cwd=ROOT, env=ENV, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p

def log_records(out_dir):
    """The records of a run's log.jsonl, in order."""
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]

def sample(*args):
    """sample.py run as a user runs it, with args."""
    return run_script([sys.executable, "sample.py", *args], cwd=ROOT, env=ENV, timeout=300)

def losses(out_dir):
    """{iter: training loss} and {iter: val loss} from log.jsonl."""
    recs = log_records(out_dir)
    return ({r["iter"]: r["loss"] for r in recs if "loss" in r},
            {r["iter"]: r["val_loss"] for r in recs if "val_loss" in r})

# -----------------------------------------------------------------------------
# settings

CONFIG_FILES = sorted(os.path.basename(f) for f in os.listdir(os.path.join(ROOT, "config"))
                      if f.endswith(".py"))

def config_model(name, data_dir):
    """config/<name> as train.py reads it, with its data from data_dir: (settings, model built on
    the meta device: no memory, even at paper sizes)."""
    import torch
    S, M, model_keys = train.load_settings([f"config/{name}", f"--data_dir={data_dir}"])
    config = M.Config(**{k: S[k] for k in model_keys if k in S})
    if getattr(config, "asr_data_dir", ""):  # SALMONN's speech corpus: not in the test corpus
        config.asr_data_dir = ""
    if getattr(config, "llm_init", "") == "gpt2":  # Hugging Face's GPT-2 base: its published sizes
        config.llm_n_layer, config.llm_n_head, config.llm_n_embd = 12, 12, 768
        config.llm_block_size = 1024
    if getattr(config, "llm_init", ""):  # the LM is another stage's output (or GPT-2): its sizes
        config.llm_init = ""             # are the config's own llm_* fields here
    tok = tokenizer.load_tokenizer(data_dir, config.tokenizer, offline=True) \
        if getattr(config, "tokenizer", None) else None
    train.load_model_data(M, data_dir, config, tok)
    with torch.device("meta"):
        return S, M.Model(config)

@pytest.mark.parametrize("name", CONFIG_FILES)
@pytest.mark.usefixtures("synth_c0")  # the mels config/whisper_gpt_hybrid_c0_cpu.py trains on
def test_every_config_file_builds_its_model(name, synth_dir):
    """Each config file as train.py reads it: every key a setting of train.py or a field of its
    model's Config, of the right type; its model's data loads from the test corpus (the fields
    load_data derives from it filled in) and the model its sizes describe builds."""
    S, model = config_model(name, synth_dir)
    assert sum(p.numel() for p in model.parameters()) > 0
    assert S["out_dir"].startswith("out/") and S["data_dir"] == synth_dir

@pytest.mark.usefixtures("synth_c0")
def test_config_files_that_start_from_another_stage_share_its_sizes(synth_dir):
    """A config whose init_from or *_init names another config's checkpoint (out_dir/ckpt.pt)
    builds every weight the two models share with the same shape, so the stages chain as the
    README runs them: a later stage has no *_init file to take the sizes from, and train.py would
    stop on a shape mismatch only after the earlier stages' minutes of training."""
    built = {name: config_model(name, synth_dir) for name in CONFIG_FILES}
    by_out = {S["out_dir"]: name for name, (S, _) in built.items()}
    pairs = []
    for name, (S, model) in built.items():
        for key in ("init_from", "llm_init", "whisper_init", "beats_init"):
            start = str(S.get(key, ""))
            source = by_out.get(os.path.dirname(start)) if start.endswith("ckpt.pt") else None
            if source is None or (key == "llm_init" and S["model"] == "pengi"):
                continue  # Pengi's configs name no LM sizes: every stage reads them from llm_init
            mine, theirs = model.state_dict(), built[source][1].state_dict()
            shared = [k for k in mine if k in theirs]
            assert shared, (name, key, source)
            bad = [k for k in shared if mine[k].shape != theirs[k].shape]
            assert not bad, (name, key, source, bad[:3])
            if key == "init_from":  # train.py stops on weights of init_from this model lacks
                lacking = [k for k in theirs if k not in mine]
                assert not lacking, (name, source, lacking[:3])
            pairs.append((name, source))
    # the chains the README runs: Pengi from its clap stage, SALMONN's stages from each other and
    # from the encoders' and the LLM's own stages
    assert {("pengi_synth.py", "pengi_clap.py"), ("salmonn_stage2.py", "salmonn_stage1.py"),
            ("salmonn_stage3.py", "salmonn_stage2.py"), ("salmonn_stage1.py", "salmonn_llm.py"),
            ("salmonn_stage1.py", "salmonn_whisper.py"),
            ("salmonn_stage1.py", "salmonn_beats.py")} <= set(pairs), pairs


def settings_error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        train.load_settings(argv)
    assert e.value.code == 2
    return capsys.readouterr().err

def test_unknown_model_options_named_with_the_closest_settings():
    """An option the model file's function does not take is named, with the options the script
    can pass it (not one the script has as its own setting, as sample.py has seed) and the
    closest of those and of the script's settings."""
    import configurator
    opts, script = {"temperature": 1.0, "seed": -1, "top_k": 50}, {"seed": 1337, "out_dir": "out"}
    with pytest.raises(ValueError) as e:
        configurator.model_options({"temprature": "1", "out_dri": "x"}, opts, "sample.py",
                                   "whisper_gpt.sample", script_settings=script)
    msg = str(e.value)
    assert "unknown setting(s) --out_dri, --temprature" in msg, msg
    assert "(temperature, top_k)" in msg, msg
    assert "--out_dri (did you mean --out_dir?)" in msg and \
        "--temprature (did you mean --temperature?)" in msg, msg
    assert configurator.misspelt(["zzz"], script) == ""

def test_model_options_typed_by_their_defaults():
    """sample.py's and eval.py's options of a model file, typed by SAMPLE_OPTS / EVAL_OPTS: text
    stays text (a label "7" is not the number 7), numbers are checked, a None default takes a
    number."""
    import configurator
    defaults = {"beam": 4, "temperature": 0.0, "lora_scale": None, "candidates": "", "probe": True}
    got = configurator.option_values({"beam": "2", "temperature": "1", "lora_scale": "2",
                                      "candidates": "7", "probe": "False"}, defaults)
    assert got == {"beam": 2, "temperature": 1.0, "lora_scale": 2, "candidates": "7",
                   "probe": False}
    assert type(got["temperature"]) is float
    for key, raw, said in (("beam", "2.7", "a whole number"), ("beam", "True", "a whole number"),
                           ("temperature", "abc", "a number"), ("lora_scale", "abc", "a number"),
                           ("temperature", "True", "a number"), ("lora_scale", "False", "a number"),
                           ("probe", "yes", "True or False")):
        with pytest.raises(ValueError, match=f"--{key}={raw}: expected {said}"):
            configurator.option_values({key: raw}, defaults)
    # a bool option takes the spellings train.py's bool settings take
    for raw, want in (("true", True), ("1", True), ("FALSE", False), ("0", False)):
        assert configurator.option_values({"probe": raw}, defaults) == {"probe": want}, raw

def test_settings_merge_and_types(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("model = 'whisper_gpt'\nn_layer = 3\nlearning_rate = 1\nout_dir = 'out/x'\n")
    S, module, model_keys = train.load_settings([str(cfg), "--n_layer=5", "--dropout=0.2",
                                                 "--use_mel=False",
                                                 "--wandb_run_name=123", "--out_dir=out/y"])
    assert (module.__name__ == "whisper_gpt" and "mel_dim" in model_keys
            and "batch_size" not in model_keys)
    assert S["n_layer"] == 5 and S["dropout"] == 0.2 and S["use_mel"] is False
    # int accepted for a float
    assert S["learning_rate"] == 1.0 and type(S["learning_rate"]) is float
    assert S["wandb_run_name"] == "123" and S["out_dir"] == "out/y"

def test_a_missing_init_from_names_the_config_that_writes_it():
    """config/pengi_synth.py starts from out/pengi-clap/ckpt.pt: when it is missing, the config
    whose out_dir that is gets named (read from config/*.py, not a list kept by hand)."""
    hint = train.writer_hint("out/pengi-clap/ckpt.pt")
    assert hint == ", e.g. python train.py config/pengi_clap.py"
    assert train.writer_hint("./out/salmonn-llm/ckpt.pt").endswith("config/salmonn_llm.py")
    assert train.writer_hint("out/nobody-writes-this/ckpt.pt") == ""
    # absolute, as out_dir is taken from where train.py runs (here the repository)
    assert train.writer_hint(os.path.abspath("out/pengi-clap/ckpt.pt")) == hint

def test_a_broken_config_file_does_not_hide_the_missing_init_from_hint(tmp_path, monkeypatch):
    """writer_hint reads every config/*.py: one that does not run is passed over, and the others
    still name the writer."""
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "a_broken.py").write_text("out_dir = (\n")
    (tmp_path / "config" / "b_writer.py").write_text(f"out_dir = {str(tmp_path / 'out' / 'w')!r}\n")
    monkeypatch.setattr(train, "HERE", str(tmp_path))
    assert train.writer_hint(str(tmp_path / "out" / "w" / "ckpt.pt")) == (
        ", e.g. python train.py config/b_writer.py")

def test_a_run_folder_given_without_a_key_is_pointed_to_out_dir(tmp_path, capsys):
    """sample.py out/run (as eval.py takes it) is refused with the setting it lacks; a script
    without an out_dir setting (bench_whisper_gpt.py) gets no such hint."""
    import configurator
    (tmp_path / "ckpt.pt").write_bytes(b"")
    with pytest.raises(SystemExit):
        configurator.parse("sample.py", [str(tmp_path)], {"out_dir": "", "clip": 0})
    assert f"a run's folder is --out_dir={tmp_path}" in capsys.readouterr().err
    for namespace in ({"clip": 0}, {"out_dir": ""}):
        if "out_dir" in namespace:  # a folder that holds no run: no such hint either
            (tmp_path / "ckpt.pt").unlink()
        with pytest.raises(SystemExit):
            configurator.parse("x.py", [str(tmp_path)], namespace)
        err = capsys.readouterr().err
        assert "expected --key=value" in err and "out_dir" not in err, err

def test_rejects_unknown_keys_and_bad_values(capsys, tmp_path):
    err = settings_error(capsys, ["--n_layr=2"])
    assert "unknown setting 'n_layr'" in err and "n_layer" in err
    err = settings_error(capsys, ["--n_layer=abc"])
    assert "--n_layer=abc" in err and "must be int" in err
    err = settings_error(capsys, ["--n_layer=2.5"])
    assert "must be int" in err
    err = settings_error(capsys, ["--use_mel=maybe"])
    assert "use_mel must be True or False" in err
    err = settings_error(capsys, ["--learning_rate"])
    assert "expected --key=value" in err
    # --key value, as other parsers take it: named as such, not as a missing config file "3"
    err = settings_error(capsys, ["--max_iters", "3"])
    assert "--max_iters 3: write --max_iters=3" in err and "config file" not in err, err
    # a bare bool flag before a config file that exists is still the flag, then the file
    cfg = tmp_path / "ok.py"
    cfg.write_text("n_layer = 3\n")
    import configurator
    entries, _ = configurator.gather(["--compile", str(cfg)], config_files=True)
    assert [(k, v) for k, v, _, _ in entries] == [("compile", None), ("n_layer", 3)]
    # where runs are positional (eval.py), a path after a bare flag is a run, missing or not
    _, rest = configurator.gather(["--mean", "out/no-such-run"], positional=True)
    assert rest == ["out/no-such-run"]
    with pytest.raises(configurator.SettingsError, match="--beam 3: write --beam=3"):
        configurator.gather(["out/no-such-run", "--beam", "3"], positional=True)
    # after a setting known to be True/False (eval.py's --mean), a folder is a run, named later if
    # it holds no checkpoint; after another, its value
    _, rest = configurator.gather(["--mean", str(tmp_path)], positional=True, bools={"mean"})
    assert rest == [str(tmp_path)]
    # a path that exists is a value too where it cannot stand alone: a folder (not a config file,
    # not a run), or any file where no bare argument is taken (sample.py's --audio)
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "weights.pt").write_bytes(b"")  # a file, but no config file
    for argv, kw in ((["--data_dir", str(data)], dict(config_files=True)),
                     (["--data_dir", str(data)], dict(positional=True)),
                     (["--init_from", str(cfg)], dict(positional=False)),
                     (["--init_from", str(tmp_path / "weights.pt")], dict(config_files=True)),
                     (["--audio", str(cfg)], {})):
        with pytest.raises(configurator.SettingsError, match=f"{argv[0]} {argv[1]}: write "):
            configurator.gather(argv, **kw)
    err = settings_error(capsys, ["--model=whisper"])
    assert "no such model file" in err
    err = settings_error(capsys, [str(tmp_path / "missing.py")])
    assert "not found" in err
    cfg = tmp_path / "bad.py"
    cfg.write_text("batch_sise = 8\n")
    err = settings_error(capsys, [str(cfg)])
    assert str(cfg) in err and "unknown setting 'batch_sise'" in err and "batch_size" in err
    cfg.write_text("dropout = '0.1'\n")
    assert "dropout must be float" in settings_error(capsys, [str(cfg)])
    cfg.write_text("n_layer = [1, 2]\n")
    assert "must be int, float, bool or str" in settings_error(capsys, [str(cfg)])
    # and as a script: a non-zero exit with the message, before any work
    p = run(["config/whisper_gpt_quick.py", "--block_sise=8"], check=False)
    assert (p.returncode == 2 and "unknown setting 'block_sise'" in p.stderr
            and "block_size" in p.stderr)

def test_configurator_bool_text_passed_on_flags_plain_types_and_private_names(tmp_path):
    """configurator's small rules, each checked directly: a bool setting reads true/false and 1/0
    in any case and nothing else; a key passed on unknown (pass_unknown) keeps its text, a bare
    --flag is None (True for a bool option, refused for another: a text option would take the
    word "True") and a config file's value its repr; only values of exactly int, float, bool or
    str are settings (a numpy float, a subclass of float, is not); a config file's _names and
    imports are not settings."""
    import configurator as K
    for raw, want in (("true", True), ("TRUE", True), ("1", True), ("false", False),
                      ("False", False), ("0", False)):
        assert K.resolve([("flag", None, raw, f"--flag={raw}")], {"flag": bool}) == \
            ({"flag": want}, {}), raw
    with pytest.raises(K.SettingsError, match="flag must be True or False"):
        K.resolve([("flag", None, "yes", "--flag=yes")], {"flag": bool})
    entries = [("probe", None, None, "--probe"), ("scale", 0.5, None, "c.py"),
               ("label", None, "7", "--label=7")]
    assert K.resolve(entries, {}, pass_unknown=True) == \
        ({}, {"probe": None, "scale": "0.5", "label": "7"})
    assert K.option_values({"probe": None}, {"probe": False}) == {"probe": True}
    with pytest.raises(K.SettingsError, match="--candidates: expected --key=value"):
        K.option_values({"candidates": None}, {"candidates": ""})
    assert K.defaults({"a": 1, "b": 2.0, "c": True, "d": "x", "_e": 1, "f": np.float64(1.0),
                       "g": [1], "SAMPLE_RATE": 24000, "n_Q": 2}) == \
        {"a": 1, "b": 2.0, "c": True, "d": "x", "n_Q": 2}  # constants (capitals) are not settings
    cfg = tmp_path / "c.py"
    cfg.write_text("import math\n_scale = 2\nn_layer = 3 * _scale\n")
    assert K.read_config_file(str(cfg)) == {"n_layer": 6}
    # a str setting keeps the text as typed, even where it reads as a literal (a tuple, a float)
    entries = [("seeds", None, "1,2", "--seeds=1,2"), ("tag", None, "1e3", "--tag=1e3")]
    assert K.resolve(entries, {"seeds": str, "tag": str}) == ({"seeds": "1,2", "tag": "1e3"}, {})

def test_config_file_runs_in_one_namespace_like_a_module(tmp_path):
    """A config file runs as a module does: a comprehension or a lambda sees the settings above it
    (run with separate globals and locals, as a class body is, they raise NameError)."""
    import configurator as K
    cfg = tmp_path / "c.py"
    cfg.write_text("n_layer = 3\nn_embd = max(16 * n_layer * k for k in (1, 2))\n"
                   "_per_head = lambda d: d // n_layer\nn_head = _per_head(n_embd) // 32\n")
    assert K.read_config_file(str(cfg)) == {"n_layer": 3, "n_embd": 96, "n_head": 1}

def test_config_files_and_settings_that_stopped_without_a_word_or_with_a_traceback(tmp_path,
                                                                                   capsys):
    """A config file that calls sys.exit() ended train.py with nothing trained and nothing said; a
    folder given as one was "not found"; a syntax error named "<string>"; a path as the model
    (--model=config/whisper_gpt_quick) was a ModuleNotFoundError traceback; an unknown DDP backend
    passed until torchrun's own traceback."""
    (tmp_path / "exits.py").write_text("import sys\nsys.exit(0)\n")
    (tmp_path / "bad.py").write_text("n_layer = 2\nn_head = (\n")
    (tmp_path / "raises.py").write_text("n_layer = 2\nn_head = n_layer // 0\n")
    for argv, said in (([str(tmp_path / "exits.py")], f"config file {tmp_path / 'exits.py'} does "
                                                       f"not run: SystemExit: 0"),
                       ([str(tmp_path)], f"config file {tmp_path}: a folder"),
                       ([str(tmp_path / "bad.py")], "SyntaxError: '(' was never closed (bad.py, "
                                                    "line 2)"),
                       ([str(tmp_path / "raises.py")], "ZeroDivisionError: integer division or "
                                                       "modulo by zero (line 2)"),
                       (["--model=config/whisper_gpt_quick"],
                        "model = 'config/whisper_gpt_quick' (--model=config/whisper_gpt_quick): "
                        "no such model file"),
                       (["--backend=foo"], None)):
        if said is None:  # checked with the other numbers, once the settings are read
            p = run(["config/whisper_gpt_quick.py", "--backend=foo", "--max_iters=1"], check=False)
            assert p.returncode == 2 and ("backend='foo': the DDP backend is one of auto, "
                                          in p.stderr and "gloo" in p.stderr), p.stderr[-2000:]
            continue
        err = settings_error(capsys, argv)
        assert said in err and "Traceback" not in err, (argv, err)

def test_bool_is_no_number_a_bare_flag_is_true_and_an_empty_value_is_text():
    """A setting's type is its default's exactly: True or False is not an int nor a float (bool is
    a subclass of int, so isinstance would take --n_layer=True as 1); a bare --flag is True for a
    bool setting; --key= (nothing after the =) is the empty text for a str setting (eval.py's
    --json= turns it off), not a bare flag."""
    import configurator as K
    for t in (int, float):
        for raw in ("True", "False"):
            with pytest.raises(K.SettingsError, match=f"x must be {t.__name__}, got bool"):
                K.resolve([("x", None, raw, f"--x={raw}")], {"x": t})
        with pytest.raises(K.SettingsError, match=f"x must be {t.__name__}, got bool"):
            K.resolve([("x", True, None, "c.py")], {"x": t})  # a config file's True
    entries, _ = K.gather(["--compile", "--json=", "--n=3"])
    assert K.resolve(entries, {"compile": bool, "json": str, "n": int}) == \
        ({"compile": True, "json": "", "n": 3}, {})

def test_parse_overrides_the_scripts_defaults_with_the_command_line_the_last_one_winning():
    """parse (sample.py, eval.py, the table and the benchmark): the script's defaults, each
    overridden by the command line where given there, the later of two; unknown keys passed on
    as text."""
    import configurator as K
    ns = {"seed": 1337, "out_dir": "out", "temperature": 0.8, "mean": False, "_private": 1}
    settings, unknown, rest = K.parse("x.py", ["--seed=7", "--mean", "--top_k=5"], ns,
                                      pass_unknown=True)
    assert settings == {"seed": 7, "out_dir": "out", "temperature": 0.8, "mean": True}
    assert unknown == {"top_k": "5"} and rest == []
    assert K.parse("x.py", ["--seed=7", "--temperature=1", "--seed=8"], ns)[0] == \
        {"seed": 8, "out_dir": "out", "temperature": 1.0, "mean": False}

# -----------------------------------------------------------------------------
# training runs

@pytest.fixture(scope="module")
def full_run(synth_dir, tmp_path_factory):
    """8 iterations in one go, with dropout and gradient accumulation 2 (the reference run)."""
    out = str(tmp_path_factory.mktemp("full"))
    run(["config/whisper_gpt_quick.py", f"--data_dir={synth_dir}", f"--out_dir={out}", *TINY,
         "--max_iters=8", "--gradient_accumulation_steps=2", "--dropout=0.1"])
    return out

def eval_batch_losses(out_dir, data_dir):
    """The run's checkpoint and, for each split, the loss of each of the eval_iters batches an
    evaluation draws (from the generator of seed (seed, 1, split index, 0)), recomputed here in
    eval mode."""
    import torch
    import whisper_gpt as W
    ck = torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)
    S = ck["config"]
    model = W.Model(W.Config(**ck["model_args"]))
    model.load_state_dict(ck["model"])
    model.eval()
    data = W.load_data(data_dir, W.Config(**ck["model_args"]), None)
    each, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # as train.py ran (its sums in the same order)
    try:
        with torch.no_grad():
            for i, split in enumerate(("train", "val")):
                rng = np.random.default_rng([S["seed"], 1, i, 0])
                each[split] = [model(**W.get_batch(data, split, S["batch_size"], rng))[1].item()
                               for _ in range(S["eval_iters"])]
    finally:
        torch.set_num_threads(threads)
    return ck, each

def test_evaluation_is_the_mean_over_eval_iters_fixed_batches(full_run, synth_dir):
    """The logged train and val losses of the last evaluation, recomputed here from the checkpoint
    of that iteration: each split's mean loss, in eval mode, over eval_iters batches drawn from
    the generator of seed (seed, 1, split index, 0), the same at every evaluation."""
    ck, each = eval_batch_losses(full_run, synth_dir)
    assert ck["config"]["eval_iters"] == 2 and ck["iter_num"] == 8
    last = [r for r in log_records(full_run) if "val_loss" in r][-1]
    assert last["iter"] == 8
    for split in ("train", "val"):
        assert abs(last[f"{split}_loss"] - np.mean(each[split])) < 1e-5, (last, each)

def test_loss_falls_and_checkpoint_is_complete(full_run):
    import torch
    train_l, val_l = losses(full_run)
    assert sorted(train_l) == list(range(1, 9)) and sorted(val_l) == [0, 4, 8]
    assert val_l[8] < val_l[0] - 0.3, val_l
    ck = torch.load(os.path.join(full_run, "ckpt.pt"), weights_only=True)  # plain types only
    assert ck["model_name"] == "whisper_gpt" and ck["iter_num"] == 8
    assert abs(ck["best_val_loss"] - val_l[8]) < 1e-6
    assert ck["model_args"]["n_layer"] == 1 and ck["model_args"]["vocab_size"] == 1024
    assert ck["config"]["gradient_accumulation_steps"] == 2 and "state" in ck["optimizer"]
    assert not any(f.endswith(".tmp") for f in os.listdir(full_run))

def test_resume_equals_uninterrupted(full_run, synth_dir, tmp_path):
    out = str(tmp_path)
    common = ["config/whisper_gpt_quick.py", f"--data_dir={synth_dir}", f"--out_dir={out}", *TINY,
              "--gradient_accumulation_steps=2", "--dropout=0.1"]
    run(common + ["--max_iters=4"])  # stops after 4 iterations (checkpoint at 4)
    p = run(common + ["--max_iters=8", "--init_from=resume"])
    # the one setting that changed is named
    assert "resuming with settings other than the run's: max_iters=4 -> 8\n" in p.stdout, p.stdout
    full, _ = losses(full_run)
    resumed, val = losses(out)
    assert sorted(resumed) == list(range(1, 9))
    # the log holds each iteration once: the checkpoint's eval (iter 4) is not repeated
    recs = log_records(out)
    assert [r["iter"] for r in recs if "loss" in r] == list(range(1, 9))
    assert [r["iter"] for r in recs if "val_loss" in r] == [0, 4, 8]
    for it in range(1, 9):
        assert resumed[it] == full[it], (it, resumed[it], full[it])  # bit for bit on CPU
    assert val[8] == losses(full_run)[1][8]
    # a model setting cannot change on resume: the run's model goes on, and the command says so,
    # also for a field the run left at its default (bias)
    p = run(common + ["--max_iters=9", "--init_from=resume", "--n_layer=3", "--bias=True"])
    assert ("resuming the run's model as it was; not used from this command: bias=True (the "
            "run's: False), n_layer=3 (the run's: 1) (--overwrite=True" in p.stdout), p.stdout
    import torch
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    # and the settings saved with it are the model's, so the same command goes on from there
    assert ck["model_args"]["n_layer"] == 1 and ck["config"]["n_layer"] == 1
    assert ck["model_args"]["bias"] is False and ck["config"]["bias"] is False
    # optimizer settings do change on resume, as announced (the saved state would bring back the
    # run's), and an evaluation alone (eval_only) adds nothing to the run's log
    p = run(common + ["--max_iters=10", "--init_from=resume", "--weight_decay=0.05",
                      "--beta2=0.9"])
    assert "weight_decay=0.1 -> 0.05" in p.stdout, p.stdout
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    groups = ck["optimizer"]["param_groups"]
    # the new decay on the decayed group (dim >= 2) only: biases and norms stay undecayed
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert all(tuple(g["betas"]) == (0.9, 0.9) for g in groups)
    log_before = open(os.path.join(out, "log.jsonl")).read()
    p = run(common + ["--max_iters=10", "--init_from=resume", "--eval_only=True", "--n_layer=2"])
    assert open(os.path.join(out, "log.jsonl")).read() == log_before
    # it says what it evaluates (the run's model, whatever model settings the command gives), and
    # nothing of resuming or of training iterations
    ckpt = os.path.join(out, "ckpt.pt")
    assert (f"evaluating {ckpt} (iter 10) with this command's batch_size=4 and eval_iters=2"
            in p.stdout and "resuming" not in p.stdout), p.stdout
    assert ("evaluating the run's model as it was; not used from this command: n_layer=2 (the "
            "run's: 1)" in p.stdout), p.stdout
    assert p.stdout.rstrip().endswith(f"done: evaluated {ckpt} (iter 10)"), p.stdout[-300:]
    # without init_from, eval_only evaluates the run in out_dir too (not fresh weights)
    said = [l for l in p.stdout.splitlines() if l.startswith("step 10: train loss")]
    again = run(common + ["--max_iters=10", "--eval_only=True"])
    assert len(said) == 1 and said[0] in again.stdout.splitlines(), (said, again.stdout)

def test_resume_keeps_an_eval_it_does_not_redo(synth_dir, tmp_path):
    """A run ended at iter 6 (evals at 0, 4 and its last, 6) resumed to 8: the loop does not
    evaluate at 6 again (6 is no multiple of eval_interval 4), so the log keeps that eval."""
    out = str(tmp_path)
    cmd = ["config/whisper_gpt_quick.py", f"--data_dir={synth_dir}", f"--out_dir={out}", *TINY]
    first = run(cmd + ["--max_iters=6"]).stdout
    run(cmd + ["--max_iters=8", "--init_from=resume"])
    recs = log_records(out)
    assert [r["iter"] for r in recs if "val_loss" in r] == [0, 4, 6, 8]
    # checkpoints at the evals after training began, not of the untrained weights at iter 0
    assert re.findall(r"saved .* \(iter (\d+)\)", first) == ["4", "6"], first
    assert [r["iter"] for r in recs if "loss" in r] == list(range(1, 9))

def test_best_only_checkpoint_run_is_finished_and_log_restarts(synth_dir, tmp_path):
    """always_save_checkpoint=False keeps the best weights (iter 4: the lr is 0 after it, so the
    val loss cannot improve again) and notes where the run ended, so the same command again does
    nothing; --overwrite=True starts the log anew."""
    import torch
    out = str(tmp_path)
    cmd = ["config/whisper_gpt_quick.py", f"--data_dir={synth_dir}", f"--out_dir={out}", *TINY,
           "--max_iters=8", "--lr_decay_iters=4", "--min_lr=0", "--always_save_checkpoint=False"]
    run(cmd)
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ck["iter_num"] == 4 and ck["end_iter"] == 8
    before = open(os.path.join(out, "log.jsonl")).read()
    p = run(cmd)
    assert "this run is finished (iter 8), nothing to do" in p.stdout, p.stdout
    # a model field given at its default (the run left it unset) is the same run
    p = run(cmd + ["--bias=False"])
    assert "this run is finished (iter 8), nothing to do" in p.stdout, p.stdout
    assert open(os.path.join(out, "log.jsonl")).read() == before
    # eval_only evaluates the kept weights (iter 4) all the same, and writes nothing
    _, val = losses(out)
    p = run(cmd + ["--eval_only=True"])
    assert ("step 4: train loss" in p.stdout and f"val loss {val[4]:.4f}" in p.stdout
            and "done: evaluated" in p.stdout), p.stdout
    assert open(os.path.join(out, "log.jsonl")).read() == before
    # extended to 12 without a better val loss (the lr is 0 after 4): the checkpoint notes the
    # settings it ended with, so that command, with or without init_from=resume, is finished
    p = run(cmd + ["--init_from=resume", "--max_iters=12"])
    # (it says that it goes on from the best weights, not from where it ended)
    assert (f"{os.path.join(out, 'ckpt.pt')}: the run saved only its best weights "
            f"(always_save_checkpoint=False), of iter 4: the iterations after it are trained "
            f"again" in p.stdout), p.stdout
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ck["iter_num"] == 4 and ck["end_iter"] == 12 and ck["config"]["max_iters"] == 12
    for extra in ([], ["--init_from=resume"]):
        p = run(cmd + ["--max_iters=12"] + extra)
        assert "this run is finished (iter 12" in p.stdout, (extra, p.stdout)
    p = run(cmd + ["--overwrite=True", "--max_iters=2"])
    recs = log_records(out)
    assert [r["iter"] for r in recs if "loss" in r] == [1, 2]
    # its two iterations (0 and 1) both warm up (warmup_iters=2): said
    assert "note: max_iters=2 ends inside the warmup (warmup_iters=2)" in p.stdout, p.stdout
    # from another run's weights, with a learning rate of 0 (never better than its start): the
    # start is saved as the best, and the run is finished
    start = os.path.join(out, "ckpt.pt")
    fine = str(tmp_path / "fine")
    run(["config/whisper_gpt_quick.py", f"--data_dir={synth_dir}", f"--out_dir={fine}", *TINY,
         "--max_iters=4", "--learning_rate=0", "--min_lr=0", "--always_save_checkpoint=False",
         f"--init_from={start}"])
    ck = torch.load(os.path.join(fine, "ckpt.pt"), weights_only=True)
    assert ck["iter_num"] == 0 and ck["end_iter"] == 4
    assert torch.equal(ck["model"]["wte.weight"],
                       torch.load(start, weights_only=True)["model"]["wte.weight"])
    # from scratch, never better than the untrained start (lr 0): the untrained weights are no
    # "best" to keep, the first trained eval saves, and the run ends with a checkpoint
    scratch = str(tmp_path / "scratch")
    p = run(["config/whisper_gpt_quick.py", f"--data_dir={synth_dir}", f"--out_dir={scratch}",
             *TINY, "--max_iters=4", "--learning_rate=0", "--min_lr=0",
             "--always_save_checkpoint=False"])
    ck = torch.load(os.path.join(scratch, "ckpt.pt"), weights_only=True)
    _, val = losses(scratch)
    assert ck["iter_num"] == 4 and ck["best_val_loss"] == val[4], (ck["iter_num"], val)
    assert f"best val loss {val[4]:.4f}" in p.stdout

def test_saves_follow_always_save_and_the_best_val_loss_survives_a_resume(synth_dir, tmp_path):
    """With lr_decay_iters=4 and min_lr=0 the weights stop changing after iteration 4, so every
    later val loss equals iteration 4's and none improves. always_save_checkpoint=True saves at
    such an eval all the same (iteration 6, its last). Resumed from there (no eval at 6: no multiple
    of 4) with always_save_checkpoint=False, the run knows the best val loss so far from the
    checkpoint, so its eval at 8, no better, saves nothing: the checkpoint stays iteration 6's,
    noting the end at 8, with the least val loss logged."""
    import torch
    out = str(tmp_path)
    cmd = ["config/whisper_gpt_quick.py", f"--data_dir={synth_dir}", f"--out_dir={out}", *TINY,
           "--lr_decay_iters=4", "--min_lr=0"]
    run(cmd + ["--max_iters=6"])
    _, val = losses(out)
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert val[6] == val[4] and ck["iter_num"] == 6
    run(cmd + ["--max_iters=8", "--init_from=resume", "--always_save_checkpoint=False"])
    _, val = losses(out)
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert sorted(val) == [0, 4, 6, 8] and val[8] == val[6]
    assert ck["iter_num"] == 6 and ck["end_iter"] == 8
    assert ck["best_val_loss"] == min(val.values())

def test_best_val_loss_is_the_least_logged_not_the_latest(synth_dir, tmp_path):
    """At a learning rate of 1 the val loss rises between the evals at 4 and 8: the best val loss
    the checkpoint at 8 notes (always_save_checkpoint=True) is the least one of the weights that
    may be saved, iteration 4's, not the latest (nor the untrained start's, lower still)."""
    import torch
    out = str(tmp_path)
    run(["config/whisper_gpt_quick.py", f"--data_dir={synth_dir}", f"--out_dir={out}", *TINY,
         "--max_iters=8", "--learning_rate=1", "--min_lr=1", "--warmup_iters=0"])
    _, val = losses(out)
    assert val[8] > val[4]  # the scenario: the latest eval is not the best
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ck["iter_num"] == 8 and ck["best_val_loss"] == val[4], (val, ck["best_val_loss"])

def test_half_precision_dtypes_run_under_autocast(synth_dir, tmp_path):
    """dtype=bfloat16 and float16 run the model under torch.autocast (on the CPU too): the untrained
    model's val loss at iteration 0 (the same weights and eval batches in each run) differs from
    float32's, by less than 0.2 % (measured: ~1e-5 nats of ~6.9)."""
    val = {}
    for dtype in ("float32", "bfloat16", "float16"):
        out = str(tmp_path / dtype)
        run(["config/whisper_gpt_quick.py", f"--data_dir={synth_dir}", f"--out_dir={out}", *TINY,
             "--max_iters=0", f"--dtype={dtype}", "--device=cpu"])
        val[dtype] = losses(out)[1][0]
    for dtype in ("bfloat16", "float16"):
        assert val[dtype] != val["float32"], (dtype, val)
        assert abs(val[dtype] - val["float32"]) < 0.002 * val["float32"], (dtype, val)

@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_trains_and_resumes(full_run, synth_dir, tmp_path, dtype):
    """The autocast paths a GPU uses, run on the CPU: the loss falls as in float32 (within 0.02
    nats of it at iteration 8, measured ~1e-4, and still falling after the resume at 4), float16's
    GradScaler state is saved and restored on resume, and the weights stay float32."""
    import torch
    out = str(tmp_path)
    common = ["config/whisper_gpt_quick.py", f"--data_dir={synth_dir}", f"--out_dir={out}", *TINY,
              "--gradient_accumulation_steps=2", "--dropout=0.1", f"--dtype={dtype}",
              "--device=cpu"]
    run(common + ["--max_iters=4"])
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ("scaler" in ck) == (dtype == "float16")
    if dtype == "float16":
        assert ck["scaler"]["scale"] > 0 and ck["scaler"]["_growth_tracker"] == 4
    assert all(v.dtype == torch.float32 for v in ck["model"].values() if v.is_floating_point())
    run(common + ["--max_iters=8", "--init_from=resume"])
    _, val = losses(out)
    _, val32 = losses(full_run)  # the same run in float32
    assert val[8] < val[0] - 0.3 and val[8] < val[4] - 0.15, val  # it learnt after the resume too
    assert abs(val[8] - val32[8]) < 0.02, (val, val32)
    if dtype == "float16":  # four more unskipped steps on the restored tracker
        ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
        assert ck["scaler"]["_growth_tracker"] == 8

def test_lr_schedule_warmup_cosine_min(synth_dir, tmp_path):
    """The lr of every iteration (TINY: warmup 2, decay to iteration 8, 1e-2 -> 2.5e-3), against
    the schedule written out here: linear warmup lr*(it+1)/(warmup+1), then cosine from lr at
    it=warmup to min_lr at it=decay_end, then min_lr. log.jsonl's record for iteration k holds the
    lr of the step that made it (it = k-1); the checkpoint's optimizer holds the lr set for the
    step after its iter_num, so a run split at 5 checks a cosine value in the optimizer itself."""
    import torch
    # min_lr not lr / 10: the floor after decay_end must be min_lr itself
    lr0, lr_min, warmup, decay_end = 1e-2, 2.5e-3, 2, 8

    def expected(it):
        if it < warmup:
            return lr0 * (it + 1) / (warmup + 1)
        if it >= decay_end:
            return lr_min
        progress = (it - warmup) / (decay_end - warmup)  # 0 at it=warmup, 1 at it=decay_end
        return lr_min + (lr0 - lr_min) * (1 + math.cos(math.pi * progress)) / 2
    # by-hand spot values: warmup 1/3 and 2/3 of lr0; the cosine's midpoint (it=5) halfway
    assert abs(expected(0) - lr0 / 3) < 1e-15 and abs(expected(5) - (lr0 + lr_min) / 2) < 1e-15

    out = str(tmp_path)
    common = ["config/whisper_gpt_quick.py", f"--data_dir={synth_dir}", f"--out_dir={out}", *TINY,
              f"--min_lr={lr_min}"]
    opt_lrs = {}
    for max_iters, extra in ((5, []), (10, ["--init_from=resume"])):
        run(common + [f"--max_iters={max_iters}", *extra])
        ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
        assert ck["iter_num"] == max_iters
        opt_lrs[max_iters] = [g["lr"] for g in ck["optimizer"]["param_groups"]]
    recs = log_records(out)
    logged = {r["iter"]: r["lr"] for r in recs if "lr" in r}
    assert sorted(logged) == list(range(1, 11))
    for k in range(1, 11):
        assert math.isclose(logged[k], expected(k - 1), rel_tol=1e-9), (k, logged[k],
                                                                         expected(k - 1))
    for it, lrs in opt_lrs.items():
        assert lrs and all(math.isclose(x, expected(it), rel_tol=1e-9) for x in lrs), (it, lrs)

def test_lr_decays_to_max_iters_by_default(synth_dir, tmp_path):
    """lr_decay_iters=0 (the default) decays to max_iters: the logged lr of each iteration of a
    6-iteration run with warmup 2 against the schedule written out with decay_end = 6."""
    out = str(tmp_path)
    run(["config/whisper_gpt_quick.py", f"--data_dir={synth_dir}", f"--out_dir={out}", *TINY,
         "--lr_decay_iters=0", "--max_iters=6", "--eval_interval=100"])
    lr0, lr_min, warmup, decay_end = 1e-2, 1e-3, 2, 6
    recs = log_records(out)
    logged = {r["iter"]: r["lr"] for r in recs if "lr" in r}
    assert sorted(logged) == list(range(1, 7))
    for k, lr in logged.items():
        it = k - 1
        want = (lr0 * (it + 1) / (warmup + 1) if it < warmup else
                lr_min + (lr0 - lr_min) * (1 + math.cos(math.pi * (it - warmup)
                                                        / (decay_end - warmup))) / 2)
        assert math.isclose(lr, want, rel_tol=1e-9), (k, lr, want)

def test_log_records_each_logged_iteration_and_the_mfu_from_peak_flops(synth_dir, tmp_path):
    """log_interval=2 with max_iters=3: iterations 2 and 3 (the last) are logged, each with its
    loss, lr, ms_per_iter and tok_per_s; evaluations (0 and the last) are their own records. With
    --peak_flops on a CPU the iteration line shows the MFU: 6 flops per (trainable) parameter per
    token times the logged tokens per second, over peak_flops."""
    import torch
    import whisper_gpt as W
    out = str(tmp_path)
    p = run(["config/whisper_gpt_quick.py", f"--data_dir={synth_dir}", f"--out_dir={out}", *TINY,
             "--max_iters=3", "--log_interval=2", "--eval_interval=100", "--peak_flops=1e9"])
    recs = log_records(out)
    steps = [r for r in recs if "loss" in r]
    assert [r["iter"] for r in steps] == [2, 3], recs
    assert all(set(r) == {"iter", "loss", "lr", "ms_per_iter", "tok_per_s"} for r in steps), steps
    assert all(r["ms_per_iter"] > 0 and r["tok_per_s"] > 0 for r in steps), steps
    # tokens/s times the time of one iteration: the tokens of an iteration (every target counts)
    S = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["config"]
    per_iter = S["batch_size"] * S["block_size"] * S["gradient_accumulation_steps"]
    for r in steps:
        assert r["tok_per_s"] * r["ms_per_iter"] / 1000 == pytest.approx(per_iter, rel=1e-6), r
    evals = [r for r in recs if "val_loss" in r]
    assert [(r["iter"], set(r)) for r in evals] == [(i, {"iter", "train_loss", "val_loss"})
                                                   for i in (0, 3)], recs
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    n_params = sum(q.numel() for q in W.Model(W.Config(**ck["model_args"])).parameters())
    shown = [float(m) for m in re.findall(r"^iter \d+/3 \|.* \| mfu ([\d.]+)% \|", p.stdout, re.M)]
    assert len(shown) == 2, p.stdout
    for r, mfu in zip(steps, shown):
        want = 100 * 6 * n_params * r["tok_per_s"] / 1e9
        assert abs(mfu - want) <= 0.051 + 1e-9 * want, (mfu, want)

def test_ddp_two_processes_gloo(full_run, synth_dir, tmp_path):
    """torchrun, 2 CPU processes (gloo), accumulation 2 in total = 1 per process: the same
    micro-batches and dropout masks as the single-process run with accumulation 2, so the same
    losses."""
    out = str(tmp_path)
    p = run(["--standalone", "--nproc_per_node=2", "train.py", "config/whisper_gpt_quick.py",
             f"--data_dir={synth_dir}", f"--out_dir={out}", *TINY, "--max_iters=8",
             "--gradient_accumulation_steps=2", "--dropout=0.1"],
            cmd=[sys.executable, "-m", "torch.distributed.run"])
    # the first line counts every process's sequences: 1 micro-batch of 4 in each of 2 processes
    assert "2 process(es), 8 sequences per iteration" in p.stdout, p.stdout
    ddp, val = losses(out)
    single, _ = losses(full_run)
    assert sorted(ddp) == list(range(1, 9))
    for it in range(1, 9):
        assert abs(ddp[it] - single[it]) < 1e-4, (it, ddp[it], single[it])
    assert val[8] < val[0] - 0.3
    assert os.path.isfile(os.path.join(out, "ckpt.pt"))

def test_ddp_with_accumulation_per_process_draws_the_single_process_micro_batches(synth_dir,
                                                                                  tmp_path):
    """2 processes with accumulation 4 in total (2 each): rank 0 draws micro-batches 0 and 1 of
    each iteration, rank 1 draws 2 and 3, as one process with accumulation 4 draws 0 to 3, so the
    logged losses are the same (no micro-batch drawn twice, none left out)."""
    import torch
    import whisper_gpt as W
    single, ddp = str(tmp_path / "single"), str(tmp_path / "ddp")
    common = ["config/whisper_gpt_quick.py", f"--data_dir={synth_dir}", *TINY, "--max_iters=2",
              "--gradient_accumulation_steps=4", "--dropout=0.1", "--eval_interval=100"]
    run(common + [f"--out_dir={single}"])
    p = run(["--standalone", "--nproc_per_node=2", "train.py", *common, f"--out_dir={ddp}",
             "--peak_flops=1e9"], cmd=[sys.executable, "-m", "torch.distributed.run"])
    one, two = losses(single)[0], losses(ddp)[0]
    assert sorted(one) == sorted(two) == [1, 2]
    # the MFU of 2 processes: all their tokens/s (as logged) over both processes' peak flops
    ck = torch.load(os.path.join(ddp, "ckpt.pt"), weights_only=True)
    n_params = sum(q.numel() for q in W.Model(W.Config(**ck["model_args"])).parameters())
    timed = [r for r in log_records(ddp) if "tok_per_s" in r]
    tok_s = [r["tok_per_s"] for r in timed]
    shown = [float(m)
             for m in re.findall(r"^iter \d+/2 \|.* \| mfu ([\d.]+)% \|", p.stdout, re.M)]
    assert len(shown) == len(tok_s) == 2, p.stdout
    for t, mfu in zip(tok_s, shown):
        want = 100 * 6 * n_params * t / (2 * 1e9)
        assert abs(mfu - want) <= 0.051 + 1e-9 * want, (mfu, want)
    # the logged tokens/s are both processes': times an iteration's time, 4 micro-batches of 4 x 32
    for r in timed:
        assert r["tok_per_s"] * r["ms_per_iter"] / 1000 == pytest.approx(4 * 4 * 32, rel=1e-6), r
    for it in (1, 2):
        assert abs(one[it] - two[it]) < 1e-5, (it, one[it], two[it])

def test_ddp_stops_every_process_on_a_non_finite_loss(synth_dir, tmp_path):
    """Under DDP a diverged loss stops the run (each process sees the same reduced loss): exit
    status 1, the message once (from the master), no checkpoint, no abort of gloo's threads.
    (torchrun ends the other process with SIGTERM once one has exited, so its status varies.)"""
    out = tmp_path / "ddp"
    p = run(["--standalone", "--nproc_per_node=2", "train.py", "config/whisper_gpt_quick.py",
             f"--data_dir={synth_dir}", f"--out_dir={out}", *TINY, "--max_iters=50",
             "--gradient_accumulation_steps=2", "--learning_rate=1e30", "--grad_clip=0",
             "--decay_lr=False", "--eval_interval=1000"],
            check=False, cmd=[sys.executable, "-m", "torch.distributed.run"])
    assert p.returncode == 1 and p.stderr.count("stopping (no checkpoint written)") == 1, \
        p.stderr[-2000:]
    assert "loss is nan" in p.stderr or "loss is inf" in p.stderr
    assert "terminate called" not in p.stderr and not (out / "ckpt.pt").exists()

def test_init_from_checkpoint_and_nan_stop(full_run, synth_dir, tmp_path):
    out = str(tmp_path)
    # the weights of another run, a fresh optimizer and iteration count
    p = run(["config/whisper_gpt_quick.py", f"--data_dir={synth_dir}", f"--out_dir={out}", *TINY,
             "--max_iters=2", f"--init_from={os.path.join(full_run, 'ckpt.pt')}"])
    _, val = losses(out)
    assert abs(val[0] - losses(full_run)[1][8]) < 1e-6  # same weights, same eval batches
    # always_save_checkpoint saves the evals after training began: not the start's (iter 0)
    assert re.findall(r"saved .* \(iter (\d+)\)", p.stdout) == ["2"], p.stdout
    # a re-run from other weights is another run, not this finished one; the same file spelled
    # another way is the same run
    p = run(["config/whisper_gpt_quick.py", f"--data_dir={synth_dir}", f"--out_dir={out}", *TINY,
             "--max_iters=2", f"--init_from={os.path.join(out, 'ckpt.pt')}"], check=False)
    assert p.returncode == 2 and "init_from=" in p.stderr and "other settings" in p.stderr, \
        p.stderr
    same = os.path.relpath(os.path.join(full_run, "ckpt.pt"), ROOT)
    p = run(["config/whisper_gpt_quick.py", f"--data_dir={synth_dir}", f"--out_dir={out}/", *TINY,
             "--max_iters=2", f"--init_from={same}"])
    assert "this run is finished" in p.stdout, p.stdout
    p = run(["config/whisper_gpt_quick.py", f"--data_dir={synth_dir}", f"--out_dir={out}", *TINY,
             "--max_iters=50", "--overwrite=True",
             "--learning_rate=1e30", "--grad_clip=0", "--decay_lr=False", "--eval_interval=1000"],
             check=False)
    assert p.returncode == 1 and "stopping (no checkpoint written)" in p.stderr, p.stderr[-2000:]
    assert "loss is nan" in p.stderr or "loss is inf" in p.stderr
    # --overwrite=True restarted the log: the old run's checkpoint went with it, before any save
    assert not os.path.exists(os.path.join(out, "ckpt.pt"))

def test_an_infinite_loss_stops_training_too(synth_dir, tmp_path):
    """An infinite loss (not NaN) stops training as NaN does: a model whose logits are +-3e38 for
    every input (ln_f made constant, lm_head's first column the logits) gives each target but token
    0 an infinite loss, which stops the run at its first evaluation (iter 0), with nothing saved."""
    import torch
    base = ["config/whisper_gpt_quick.py", f"--data_dir={synth_dir}", *TINY, "--bias=True",
            "--eval_interval=1000"]
    p = run(base + [f"--out_dir={tmp_path / 'a'}", "--max_iters=1"])
    # (a trial run shorter than its warmup is told so: its rate never reaches learning_rate)
    assert "note: max_iters=1 ends inside the warmup (warmup_iters=2)" in p.stdout, p.stdout
    ck = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    w = ck["model"]
    w["ln_f.weight"].zero_()
    w["ln_f.bias"].zero_()
    w["ln_f.bias"][0] = 1.0  # ln_f's output: (1, 0, ..., 0) at every position
    w["lm_head.weight"].zero_()
    w["lm_head.weight"][:, 0] = -3e38
    w["lm_head.weight"][0, 0] = 3e38  # token 0's logit 3e38, the others' -3e38: 6e38 apart, inf
    torch.save(ck, tmp_path / "inf.pt")
    p = run(base + [f"--out_dir={tmp_path / 'b'}", "--max_iters=4",
                    f"--init_from={tmp_path / 'inf.pt'}"], check=False)
    assert p.returncode == 1 and "val loss inf" in p.stdout, p.stdout
    assert ("train.py: the evaluation's loss is not finite at iter 0: stopping (no checkpoint "
            "written)" in p.stderr), p.stderr[-2000:]
    assert not (tmp_path / "b" / "ckpt.pt").exists()

def test_a_non_finite_evaluation_keeps_the_last_checkpoint(synth_dir, tmp_path):
    """A NaN val loss (here a damaged val_mel.bin: training reads the train split alone) stops the
    run before the save that would replace the last good checkpoint with what gave it; eval_only
    on it says so too, without the training hints."""
    import torch
    data = tmp_path / "data"
    data.mkdir()
    for name in os.listdir(synth_dir):  # the corpus, its val mel a copy of its own
        if name != "val_mel.bin":
            os.symlink(os.path.join(synth_dir, name), data / name)
    mel = np.fromfile(os.path.join(synth_dir, "val_mel.bin"), dtype=np.float16)
    mel.tofile(data / "val_mel.bin")
    out = tmp_path / "run"
    cmd = ["config/whisper_gpt_quick.py", f"--data_dir={data}", f"--out_dir={out}", *TINY]
    run(cmd + ["--max_iters=4"])
    saved = (out / "ckpt.pt").read_bytes()
    np.full_like(mel, np.nan).tofile(data / "val_mel.bin")
    p = run(cmd + ["--max_iters=8", "--init_from=resume"], check=False)
    assert p.returncode == 1 and "val loss nan" in p.stdout, p.stdout + p.stderr[-2000:]
    assert (f"train.py: the evaluation's loss is not finite at iter 4: stopping ({out / 'ckpt.pt'}"
            f", the last save, is kept). Try a lower learning_rate" in p.stderr), p.stderr[-2000:]
    assert (out / "ckpt.pt").read_bytes() == saved
    p = run(cmd + ["--eval_only=True"], check=False)
    assert p.returncode == 1 and "is kept).\n" in p.stderr and "Try" not in p.stderr, p.stderr
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 4

def test_a_damaged_tensor_in_a_checkpoint_is_named(full_run, synth_dir, tmp_path):
    """Bytes damaged inside a saved tensor pass torch.load (its tensors carry no checksum); a NaN
    among them, in the weights or the optimizer's state, stops a resume or an init_from with one
    line naming the tensor, instead of training (and saving) from it."""
    import torch
    ck = torch.load(os.path.join(full_run, "ckpt.pt"), weights_only=True)
    ck["optimizer"]["state"][0]["exp_avg_sq"].view(-1)[3] = float("nan")
    out = tmp_path / "a"
    out.mkdir()
    torch.save(ck, out / "ckpt.pt")
    cmd = ["config/whisper_gpt_quick.py", f"--data_dir={synth_dir}", *TINY, "--max_iters=12"]
    p = run(cmd + [f"--out_dir={out}", "--init_from=resume"], check=False)
    assert p.returncode == 2 and (f"resuming: {out / 'ckpt.pt'}: optimizer.state.0.exp_avg_sq "
                                  f"holds NaN or inf values: the file is damaged" in p.stderr), \
        p.stderr[-2000:]
    ck = torch.load(os.path.join(full_run, "ckpt.pt"), weights_only=True)
    ck["model"]["lm_head.weight"][5, 5] = float("inf")
    torch.save(ck, tmp_path / "inf.pt")
    p = run(cmd + [f"--out_dir={tmp_path / 'b'}", f"--init_from={tmp_path / 'inf.pt'}"],
            check=False)
    assert p.returncode == 2 and "model.lm_head.weight holds NaN or inf" in p.stderr, p.stderr
    assert not (tmp_path / "b").exists()

def test_out_dirs_a_run_cannot_use_are_refused_in_one_line(synth_dir, tmp_path):
    """A folder named ckpt.pt where the checkpoint goes (even with overwrite=True, which would
    remove it), another model's run in out_dir (named as such, not as a list of settings), and
    eval_only with no checkpoint to evaluate (fresh weights' losses would pass for a result)."""
    cmd = ["config/whisper_gpt_quick.py", f"--data_dir={synth_dir}", *TINY, "--max_iters=2"]
    (tmp_path / "d" / "ckpt.pt").mkdir(parents=True)
    for extra in ([], ["--overwrite=True"]):
        p = run(cmd + [f"--out_dir={tmp_path / 'd'}"] + extra, check=False)
        assert p.returncode == 2 and (f"{tmp_path / 'd' / 'ckpt.pt'}: a folder, where train.py "
                                      f"keeps its checkpoint file" in p.stderr), p.stderr
        assert "Traceback" not in p.stderr
    salmonn_checkpoint(str(tmp_path / "s"), synth_dir)
    p = run(cmd + [f"--out_dir={tmp_path / 's'}"], check=False)
    assert p.returncode == 2 and "holds a salmonn run, not whisper_gpt" in p.stderr, p.stderr
    p = run(cmd + [f"--out_dir={tmp_path / 'typo'}", "--eval_only=True"], check=False)
    assert p.returncode == 2 and (f"eval_only: {tmp_path / 'typo' / 'ckpt.pt'} not found, "
                                  f"nothing to evaluate" in p.stderr), p.stderr
    assert not (tmp_path / "typo").exists()

def test_a_log_line_that_is_not_train_pys_is_dropped_on_resume(synth_dir, tmp_path):
    """A resumed run keeps its log's records before the checkpoint; a line written there by hand
    (JSON, but no record of train.py's) is dropped, not a KeyError."""
    out = tmp_path / "run"
    cmd = ["config/whisper_gpt_quick.py", f"--data_dir={synth_dir}", f"--out_dir={out}", *TINY]
    run(cmd + ["--max_iters=4"])
    with open(out / "log.jsonl", "a") as f:
        f.write('{"note": "lr looked high"}\n[1, 2]\n{"iter": "four"}\n')
    run(cmd + ["--max_iters=8", "--init_from=resume"])
    recs = log_records(str(out))
    assert [r["iter"] for r in recs if "loss" in r] == list(range(1, 9))
    assert all(isinstance(r, dict) and isinstance(r["iter"], int) for r in recs)

def test_a_resumed_run_keeps_its_start(full_run, synth_dir, tmp_path):
    """A run resumed with init_from=resume still records where it started, so a later command
    from other weights into its out_dir is another run (refused), not this one continued."""
    out = str(tmp_path / "b")
    base = ["config/whisper_gpt_quick.py", f"--data_dir={synth_dir}", f"--out_dir={out}", *TINY]
    run(base + ["--max_iters=2"])
    run(base + ["--max_iters=4", "--init_from=resume"])
    p = run(base + ["--max_iters=4", f"--init_from={os.path.join(full_run, 'ckpt.pt')}"],
            check=False)
    assert p.returncode == 2 and "init_from='scratch' there" in p.stderr, p.stdout + p.stderr

def test_eval_only_writes_nothing_and_bad_numbers_are_named(full_run, synth_dir, tmp_path):
    """eval_only makes no out_dir; optimizer numbers out of range and model sizes that do not
    build a model stop train.py in one line naming them, before any work."""
    none = tmp_path / "none"
    # (best-only saving from another run's weights would save its first eval: not an evaluation's)
    p = run(["config/whisper_gpt_quick.py", f"--data_dir={synth_dir}", f"--out_dir={none}", *TINY,
             "--eval_only=True", f"--init_from={os.path.join(full_run, 'ckpt.pt')}",
             "--always_save_checkpoint=False"])
    assert not none.exists()
    assert p.stdout.startswith(f"whisper_gpt: evaluating {none}/ on data"), p.stdout[:300]
    for args, said in ((["--min_lr=-1"], "min_lr=-1.0: must be a finite number, at least 0"),
                       (["--beta2=2"], "beta2=2.0: must be at least 0 and below 1"),
                       (["--n_head=3"], "n_embd 32 must be divisible by n_head 3"),
                       (["--min_lr=0.1"], "min_lr=0.1: above learning_rate=0.01"),  # would rise
                       (["--lr_decay_iters=1"], "lr_decay_iters=1: below warmup_iters=2"),
                       (["--seed=-1"], "seed=-1: must be at least 0 and below 2**63"),
                       (["--peak_flops=-1"], "peak_flops=-1.0: must be a finite number"),
                       (["--overwrite=True", "--init_from=resume"],
                        "overwrite=True with init_from=resume: one trains anew"),
                       # the start would be removed before anything replaced it
                       (["--overwrite=True", f"--init_from={tmp_path}/x/./ckpt.pt"],
                        f"overwrite=True with init_from={tmp_path}/x/./ckpt.pt: that is the "
                        f"checkpoint overwrite removes"),  # however the path is spelled
                       (["--wandb_log=True"], "wandb_log=True: wandb is not installed")):
        if args == ["--wandb_log=True"] and importlib.util.find_spec("wandb"):
            continue  # installed: nothing to refuse
        p = run(["config/whisper_gpt_quick.py", f"--data_dir={synth_dir}",
                 f"--out_dir={tmp_path / 'x'}", *TINY, *args], check=False)
        assert p.returncode == 2 and said in p.stderr and "Traceback" not in p.stderr, \
            (args, p.stderr[-1500:])
    assert not (tmp_path / "x").exists()

def test_a_second_run_into_a_busy_out_dir_is_refused(synth_dir, tmp_path):
    """One train.py writes an out_dir at a time (a lock on the folder, held while it runs): a
    second run there stops in one line before writing anything, instead of replacing the first
    one's checkpoint and mixing their logs. Where the folder cannot be locked, a note says so."""
    import fcntl
    out = tmp_path / "busy"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    # a shared lock: it blocks the exclusive one train.py must take (two shared ones would not)
    fcntl.flock(fd, fcntl.LOCK_SH)
    try:
        p = run(["config/whisper_gpt_quick.py", f"--data_dir={synth_dir}", f"--out_dir={out}",
                 *TINY, "--max_iters=1"], check=False)
    finally:
        os.close(fd)
    assert p.returncode == 2 and "another train.py is writing there" in p.stderr, p.stderr[-2000:]
    assert os.listdir(out) == []
    # a filesystem without flock (NFS, Lustre: ENOLCK, ENOSYS, EBADF): a note, and the run trains
    no_flock = ("import errno, fcntl, runpy, sys\n"
                "def flock(fd, op):\n"
                "    raise OSError(errno.ENOLCK, 'No locks available')\n"
                "fcntl.flock = flock\n"
                "sys.argv = sys.argv[1:]\n"
                "runpy.run_path('train.py', run_name='__main__')\n")
    p = run_script([sys.executable, "-c", no_flock, "train.py", "config/whisper_gpt_quick.py",
                    f"--data_dir={synth_dir}", f"--out_dir={out}", *TINY, "--max_iters=1"],
                   cwd=ROOT, env=ENV, timeout=300)
    assert p.returncode == 0 and "cannot be locked (No locks available)" in p.stdout, p.stderr
    assert (out / "ckpt.pt").exists()

def test_a_checkpoint_that_cannot_be_written_stops_the_run_in_one_line(synth_dir, tmp_path):
    """torch.save on a full disk raises a RuntimeError after writing a part: train.py stops with
    one line naming ckpt.pt (exit 2, no traceback) and leaves no part behind. The disk is faked:
    torch.save is replaced before train.py runs."""
    full_disk = ("import runpy, sys, torch\n"
                 "def save(obj, f, *args, **kwargs):\n"
                 "    f.write(b'PK part')\n"
                 "    raise RuntimeError('[enforce fail at inline_container.cc:603] . unexpected "
                 "pos 64 vs 0')\n"
                 "torch.save = save\n"
                 "sys.argv = sys.argv[1:]\n"
                 "runpy.run_path('train.py', run_name='__main__')\n")
    out = tmp_path / "full"
    p = run_script([sys.executable, "-c", full_disk, "train.py", "config/whisper_gpt_quick.py",
                    f"--data_dir={synth_dir}", f"--out_dir={out}", *TINY, "--max_iters=1"],
                   cwd=ROOT, env=ENV, timeout=300)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert (f"{out / 'ckpt.pt'}: cannot be written (RuntimeError:" in p.stderr
            and "is the disk full?" in p.stderr), p.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["log.jsonl"]

def test_save_atomic_replaces_the_file_whole_and_leaves_no_tmp(tmp_path):
    """train.save_atomic: the new content replaces the old under the same name, loadable, with no
    .tmp left; a save that fails midway leaves the old file as it was, and removes its part."""
    import torch
    path = str(tmp_path / "ckpt.pt")
    train.save_atomic({"x": torch.arange(3)}, path)
    train.save_atomic({"x": torch.arange(5)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.arange(5))
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    with pytest.raises(Exception):
        train.save_atomic({"x": lambda: 0}, path)  # a lambda cannot be pickled
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.arange(5))
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # the failed part removed (a full disk stays full)

def test_a_checkpoint_with_fields_the_model_file_lacks_is_named(full_run, tmp_path):
    import torch
    ck = torch.load(os.path.join(full_run, "ckpt.pt"), weights_only=True)
    ck["model_args"]["a_field_of_another_version"] = 1
    torch.save(ck, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="Config lacks: a_field_of_another_version"):
        train.load_checkpoint(str(tmp_path / "ckpt.pt"))

def test_a_checkpoint_without_its_step_or_run_settings_is_not_train_pys(full_run, tmp_path):
    """load_checkpoint names the fields train.py writes that a checkpoint lacks, the iteration and
    the run's settings (which a re-run and sample.py read) among them, in one ValueError."""
    import torch
    ck = torch.load(os.path.join(full_run, "ckpt.pt"), weights_only=True)
    del ck["iter_num"], ck["config"]
    torch.save(ck, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match=r"not a checkpoint of train.py \(it has no iter_num, "
                                         r"config\)"):
        train.load_checkpoint(str(tmp_path / "ckpt.pt"))

@pytest.mark.parametrize("n", [30])
def test_sample_writes_wav_of_requested_length(full_run, synth_dir, tmp_path, n):
    wav = str(tmp_path / "x.wav")
    p = sample(f"--out_dir={full_run}", f"--data_dir={synth_dir}", "--clip=1",
               f"--max_new_tokens={n}", "--temperature=0.8", "--top_k=20", f"--out={wav}")
    assert p.returncode == 0, p.stderr
    x, sr = sf.read(wav)
    prompt = len(x) - n * 320  # the wav is the prompt, then the n frames generated after it
    assert sr == 24000 and prompt > 0 and prompt % 320 == 0
    assert f"{prompt / 24000:.2f} s prompt + {n * 320 / 24000:.2f} s continuation" in p.stdout
    # the prompt part is the clip's last frames of codebook 0 decoded (the decoder is causal, so
    # what follows does not change it), at 16-bit resolution: not rescaled, not shifted in time
    import sample as S
    clip, _ = S.read_clip(synth_dir, "val", 1)
    want = S.Tools(synth_dir).decode(clip["codes"][-(prompt // 320):, :1]).numpy().clip(-1, 1)
    assert np.abs(x[:prompt] - want).max() < 2 / 32768 and np.abs(want).max() > 0.01
    # its spectrogram next to it
    assert "tokens/s" in p.stdout and (tmp_path / "x.png").stat().st_size > 1000
    # --out naming a folder: its sample.wav; --audio: the speed leaves out the codec's loading,
    # which came before the timer
    folder = tmp_path / "samples"
    folder.mkdir()
    p = sample(f"--out_dir={full_run}", f"--data_dir={synth_dir}", "--max_new_tokens=4",
               f"--out={folder}", f"--audio={wav}")
    assert p.returncode == 0 and f"wrote {folder / 'sample.wav'}" in p.stdout, p.stderr
    seconds = float(p.stdout.split("generated 4 frames")[1].split(" in ")[1].split(" s")[0])
    assert seconds > 0, p.stdout
    assert sf.read(folder / "sample.wav")[0].size > 4 * 320
    p = sample(f"--out_dir={full_run}", f"--data_dir={synth_dir}", "--beam=3")
    # an option whisper_gpt's sample() lacks: refused, naming the ones it takes
    assert (p.returncode == 2 and "unknown setting(s) --beam" in p.stderr
            and "max_new_tokens" in p.stderr)
    # an audio result named a .txt: refused before the input is read and sampled
    p = sample(f"--out_dir={full_run}", f"--data_dir={synth_dir}", f"--out={tmp_path / 'x.txt'}")
    assert (p.returncode == 2 and "this model's result is audio" in p.stderr
            and "input:" not in p.stdout and "generated" not in p.stdout), p.stdout + p.stderr

def test_sample_seed_clip_and_audio_limits(full_run, synth_dir, tmp_path):
    """sample.py --seed decides the draw (the same seed the same continuation, another one
    another); --clip=0 with --audio is refused as any --clip is (0 is a clip, not "none"); an
    --audio over MAX_CLIP_SECONDS is refused for a model of codes, which encodes it whole."""
    from audio import MAX_CLIP_SECONDS
    wavs = {}
    for name, seed in (("a", 1), ("b", 2), ("c", 1)):
        path = tmp_path / f"{name}.wav"
        p = sample(f"--out_dir={full_run}", f"--data_dir={synth_dir}", "--clip=1",
                   "--max_new_tokens=8", "--temperature=1.0", f"--seed={seed}", f"--out={path}")
        assert p.returncode == 0, p.stderr[-2000:]
        wavs[name] = sf.read(path)[0]
    assert np.array_equal(wavs["a"], wavs["c"])
    assert wavs["a"].shape == wavs["b"].shape and not np.array_equal(wavs["a"], wavs["b"])
    sf.write(tmp_path / "long.wav", 0.1 * np.sin(np.arange((MAX_CLIP_SECONDS + 1) * 8000) / 7.0)
             .astype(np.float32), 8000)
    for args, said in ((["--clip=0", f"--audio={tmp_path / 'a.wav'}"], "not both"),
                       ([f"--audio={tmp_path / 'long.wav'}"], "too long to encode")):
        p = sample(f"--out_dir={full_run}", *args, "--max_new_tokens=1",
                   f"--out={tmp_path / 'o.wav'}")
        assert p.returncode == 2 and said in p.stderr, (args, p.stderr[-1500:])
        assert not (tmp_path / "o.wav").exists()
    # refused before sampling, not after: a continuation longer than sample.py decodes at once
    # (it would fail at the end, hours later), and an --out whose picture's name is a folder (the
    # wav was written, then the picture failed, leaving a part)
    (tmp_path / "o.png").mkdir()
    too_long = MAX_CLIP_SECONDS * 75 + 1
    for args, said in (([f"--max_new_tokens={too_long}"],
                        f"--max_new_tokens={too_long}: {MAX_CLIP_SECONDS}.01 s of audio, over "
                        f"the {MAX_CLIP_SECONDS} s a continuation may last"),
                       (["--max_new_tokens=1"], f"its picture {tmp_path / 'o.png'} is a folder")):
        p = sample(f"--out_dir={full_run}", f"--data_dir={synth_dir}", "--clip=1", *args,
                   f"--out={tmp_path / 'o.wav'}")
        assert p.returncode == 2 and said in p.stderr, (args, p.stderr[-1500:])
        assert "generated" not in p.stdout and not (tmp_path / "o.wav").exists()
        assert not list(tmp_path.glob("*tmp*")) and not list((tmp_path / "o.png").iterdir())

# -----------------------------------------------------------------------------
# text models: the checkpoint keeps its tokenizer

TEXT_TINY = ["--model=salmonn", "--stage=llm", "--llm_n_layer=1", "--llm_n_head=2",
             "--llm_n_embd=32", "--llm_block_size=32", "--batch_size=4", "--eval_iters=1",
             "--eval_interval=2", "--log_interval=1", "--warmup_iters=1", "--max_iters=2"]


def test_salmonn_asr_data_dir_is_read_in_training_only(synth_dir, tmp_path):
    """A SALMONN stage trained with asr_data_dir (more transcribed clips) records it in its config,
    but eval.py reads only the data it evaluates on: the checkpoint evaluates after that corpus is
    gone."""
    import shutil
    import torch
    extra, out = tmp_path / "asr", tmp_path / "stage2"
    shutil.copytree(synth_dir, extra)
    p = run([f"--data_dir={synth_dir}", f"--out_dir={out}", f"--asr_data_dir={extra}",
             *TEXT_TINY[:-1], "--stage=instruct", "--speech_n_layer=1", "--speech_n_embd=32",
             "--beats_n_layer=1", "--beats_n_embd=32", "--qformer_n_layer=1",
             "--qformer_n_embd=32", "--llm_block_size=160", "--llm_probe_min=0",
             "--max_iters=1", "--peak_flops=1e9"])
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["model_args"]["asr_data_dir"] == str(extra)
    # the MFU of a model with frozen parts: ~6 flops per trainable and ~4 per frozen parameter per
    # token (the LLM, frozen but for LoRA, still runs forward and backward)
    import salmonn
    m = salmonn.SALMONN(salmonn.SALMONNConfig(**ck["model_args"]))
    n_all = sum(q.numel() for q in m.parameters())
    n_trained = sum(q.numel() for q in m.parameters() if q.requires_grad)
    assert 0 < n_trained < n_all
    rec = [r for r in log_records(out) if "tok_per_s" in r][-1]
    tok_s = rec["tok_per_s"]
    # tokens/s counts the answer tokens (targets != -1) of iteration 0's batch, made again here
    data = salmonn.load_data(str(synth_dir), salmonn.SALMONNConfig(**ck["model_args"]),
                             tokenizer.tokenizer_from_record(ck["tokenizer"]))
    batch = salmonn.get_batch(data, "train", 4, np.random.default_rng([ck["config"]["seed"], 0,
                                                                       0, 0]))
    n_answer = int((batch["targets"] != -1).sum())
    assert n_answer < batch["targets"].numel()
    assert tok_s * rec["ms_per_iter"] / 1000 == pytest.approx(n_answer, rel=1e-6), rec
    mfu = float(re.search(r"^iter 1/1 \|.* \| mfu ([\d.]+)% \|", p.stdout, re.M).group(1))
    want = 100 * (6 * n_trained + 4 * (n_all - n_trained)) * tok_s / 1e9
    assert abs(mfu - want) <= 0.051 + 1e-9 * want, (mfu, want)
    # the optimizer holds the trainable parameters only (the LLM is frozen here): each of them
    # took a step, so each has its AdamW state
    held = [i for g in ck["optimizer"]["param_groups"] for i in g["params"]]
    assert sorted(held) == sorted(ck["optimizer"]["state"]), (len(held),
                                                               len(ck["optimizer"]["state"]))
    shutil.rmtree(extra)
    p = run_script([sys.executable, "eval.py", str(out), "--max_clips=2", "--beam=1",
                    "--max_new_tokens=4"], cwd=ROOT, env=ENV, timeout=300)
    assert p.returncode == 0 and "wer" in p.stdout, p.stderr[-2000:]

def test_init_from_another_stages_checkpoint_names_the_settings_for_its_parts(synth_dir,
                                                                             tmp_path):
    """A SALMONN stage-1 run given a stage-"whisper" checkpoint as init_from (whose decoder the
    stage-1 model lacks) stops in one line that names the two stages and the *_init settings that
    take another stage's parts."""
    sizes = [*TEXT_TINY[:-1], "--speech_n_layer=1", "--speech_n_embd=32", "--beats_n_layer=1",
             "--beats_n_embd=32", "--qformer_n_layer=1", "--qformer_n_embd=32",
             "--llm_block_size=160", "--llm_probe_min=0", "--whisper_dec_n_layer=1",
             f"--data_dir={synth_dir}"]
    run([*sizes, "--stage=whisper", "--max_iters=1", f"--out_dir={tmp_path / 'whisper'}"])
    p = run([*sizes, "--stage=pretrain", "--max_iters=1", f"--out_dir={tmp_path / 'stage1'}",
             f"--init_from={tmp_path / 'whisper' / 'ckpt.pt'}"], check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip().endswith(
        "(a checkpoint of stage 'whisper', this run is stage 'pretrain': another stage's parts "
        "come through whisper_init, beats_init, llm_init)"), p.stderr
    assert "the checkpoint has weights this model lacks: ['decoder." in p.stderr

def test_text_checkpoint_keeps_its_tokenizer(synth_dir, tmp_path):
    """A text model's checkpoint records the tokenizer its config names (tokenizer="corpus": with
    the BPE's ranks). A run that starts from it, eval.py and sample.py use that tokenizer, even
    after the data dir's corpus BPE changed (re-prepared data): a model never sees ids of another
    vocabulary."""
    import shutil
    import torch
    data, out, out2 = tmp_path / "data", tmp_path / "llm", tmp_path / "llm2"
    shutil.copytree(synth_dir, data)
    run([f"--data_dir={data}", f"--out_dir={out}", *TEXT_TINY])
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    assert ck["model_args"]["tokenizer"] == "corpus" and ck["tokenizer"]["name"] == "corpus"
    assert ck["tokenizer"]["ranks"] == (data / "tokenizer.tiktoken").read_text()
    assert ck["model_args"]["vocab_size"] == ck["tokenizer"]["vocab_size"]
    tokenizer.save_ranks(tokenizer.train_bpe(["another corpus, another vocabulary"] * 3, 300),
                         data / "tokenizer.tiktoken")
    p = run_script([sys.executable, "eval.py", str(out), f"--data_dir={data}", "--max_clips=2"],
                   cwd=ROOT, env=ENV, timeout=300)
    assert p.returncode == 0 and "text_ppl" in p.stdout, p.stderr[-2000:]
    # with another model's run: an option one of them lacks, or --mean over both, stops eval.py
    # before any work (it used to evaluate the first run, then stop at the second)
    full = tmp_path / "wg"
    run(["config/whisper_gpt_quick.py", f"--data_dir={synth_dir}", f"--out_dir={full}", *TINY,
         "--max_iters=1"])
    for extra, said in ((["--max_clips=2"], f"{full / 'ckpt.pt'}: unknown setting(s) --max_clips"),
                        (["--mean"], "--mean: the runs are of 2 models or stages")):
        p = run_script([sys.executable, "eval.py", str(out), str(full), f"--data_dir={data}",
                        *extra], cwd=ROOT, env=ENV, timeout=300)
        assert (p.returncode == 2 and said in p.stderr
                and "evaluated" not in p.stderr), (extra, p.stderr[-2000:])
    answer = tmp_path / "sub" / "answer.txt"  # a text result goes to a .txt --out too
    p = sample(f"--out_dir={out}", f"--data_dir={data}", "--beam=1", "--max_new_tokens=4",
               f"--out={answer}")
    assert p.returncode == 0, p.stderr[-2000:]
    written = answer.read_text()  # what was printed, before the time it took
    assert written.strip() and f"\n{written}(" in p.stdout, (written, p.stdout)
    # a folder gets sample.txt; a .wav for a text result is refused before sampling
    folder = tmp_path / "answers"
    folder.mkdir()
    p = sample(f"--out_dir={out}", f"--data_dir={data}", "--beam=1", "--max_new_tokens=4",
               f"--out={folder}")
    assert p.returncode == 0 and (folder / "sample.txt").read_text() == written, p.stderr[-2000:]
    p = sample(f"--out_dir={out}", f"--data_dir={data}", "--beam=1", "--max_new_tokens=4",
               f"--out={tmp_path / 'answer.wav'}")
    assert (p.returncode == 2 and "result is text" in p.stderr and "input: " not in p.stdout
            and not (tmp_path / "answer.wav").exists()), (p.stdout, p.stderr[-2000:])
    # a text model reads the mel of an --audio file: the data's codec is neither needed nor loaded
    (data / "codec.pt").unlink()
    sf.write(tmp_path / "tone.wav", [0.3 * math.sin(i / 9) for i in range(12000)], 24000)
    p = sample(f"--out_dir={out}", f"--data_dir={data}", f"--audio={tmp_path / 'tone.wav'}",
               "--beam=1", "--max_new_tokens=4")
    assert p.returncode == 0 and "input: " in p.stdout, p.stderr[-2000:]
    # nor the data at all: the checkpoint holds the model and its tokenizer (its data folder
    # gone; a --data_dir named that does not exist is refused, as a typo)
    shutil.move(data, tmp_path / "away")
    p = sample(f"--out_dir={out}", f"--audio={tmp_path / 'tone.wav'}", "--beam=1",
               "--max_new_tokens=4")
    shutil.move(tmp_path / "away", data)
    assert p.returncode == 0 and "input: " in p.stdout, p.stderr[-2000:]
    run([f"--data_dir={data}", f"--out_dir={out2}", *TEXT_TINY, f"--init_from={out / 'ckpt.pt'}"])
    assert torch.load(out2 / "ckpt.pt", weights_only=True)["tokenizer"] == ck["tokenizer"]
    # a config naming another tokenizer than the checkpoint it starts from is refused, naming both
    out3 = tmp_path / "llm3"
    p = run([f"--data_dir={data}", f"--out_dir={out3}", *TEXT_TINY,
             f"--init_from={out / 'ckpt.pt'}", "--tokenizer=gpt2"], check=False)
    assert p.returncode == 2 and "tokenizer 'corpus'" in p.stderr and "tokenizer='gpt2'" in p.stderr
    p = run([f"--data_dir={data}", f"--out_dir={out3}", *TEXT_TINY, "--tokenizer=bpe"], check=False)
    assert p.returncode == 2 and "tokenizer='bpe'" in p.stderr and "corpus, gpt2" in p.stderr

def test_llm_init_folder_gives_the_tokenizer_its_checkpoint_records(tmp_path, capsys):
    """llm_init may name a run folder (load_llm_state reads its ckpt.pt): the tokenizer that
    checkpoint records is used, or a config naming another is refused, as for a ckpt.pt path; a
    Hugging Face folder (no record) leaves the choice to the config."""
    from types import SimpleNamespace
    import torch
    run_dir = tmp_path / "llm"
    run_dir.mkdir()
    record = tokenizer.tokenizer_record(tokenizer.load_tokenizer("", "gpt2"))
    torch.save({"tokenizer": record}, run_dir / "ckpt.pt")
    config = SimpleNamespace(tokenizer="corpus", llm_init=str(run_dir))
    with pytest.raises(SystemExit):
        train.choose_tokenizer(config, str(tmp_path), "", None, "scratch", None)
    assert "trained with tokenizer 'gpt2', but tokenizer='corpus'" in capsys.readouterr().err
    config.tokenizer = "gpt2"
    tok = train.choose_tokenizer(config, str(tmp_path), "", None, "scratch", None)
    assert tok.n_vocab == 50257
    assert f"as recorded in {run_dir / 'ckpt.pt'}" in capsys.readouterr().out
    (run_dir / "model.safetensors").write_bytes(b"")  # a Hugging Face folder: its weights load
    config.tokenizer = "corpus"
    with pytest.raises(SystemExit):  # no corpus BPE here: the data dir's is what was asked for
        train.choose_tokenizer(config, str(tmp_path), "", None, "scratch", None)
    err = capsys.readouterr().err
    assert "trained with tokenizer" not in err and "the corpus BPE is missing" in err, err

# -----------------------------------------------------------------------------
# one training step, reproduced by hand

@pytest.mark.parametrize("grad_clip", [0.02, 0.0])
def test_first_step_reproduced_by_hand(synth_dir, tmp_path, grad_clip):
    """train.py's first iteration (accumulation 2, dropout on) redone here from its documented
    recipe, not its loop: the model built right after torch.manual_seed(seed); micro-step m draws
    its batch from np.random.default_rng([seed, 0, it, m]) and its dropout masks after
    torch.manual_seed(SeedSequence([seed, 2, it, m])); each micro-step backpropagates loss / 2 (the
    mean over micro-steps); the gradient's total norm is clipped to grad_clip (0.02 binds: the
    norm is checked to be larger; 0 = off, where a wrong gradient scale would not be clipped away);
    then one AdamW step with the logged lr, weight decay on tensors of dim >= 2 only. AdamW's first
    step is nearly sign(g), so the gradient itself is checked in its first moment: exp_avg =
    (1 - beta1) g and exp_avg_sq = (1 - beta2) g^2; the weights as p (1 - lr wd) - lr g / (|g| +
    eps). Catches summed (not averaged) micro-step gradients, a skipped clip, and micro-steps that
    share a batch or dropout masks."""
    import torch
    import whisper_gpt as W
    out = str(tmp_path)
    run(["config/whisper_gpt_quick.py", f"--data_dir={synth_dir}", f"--out_dir={out}", *TINY,
         "--max_iters=1", "--gradient_accumulation_steps=2", "--dropout=0.1",
         f"--grad_clip={grad_clip}"])
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    S = ck["config"]
    assert ck["iter_num"] == 1 and S["grad_clip"] == grad_clip and S["dropout"] == 0.1
    seed, accum = S["seed"], 2
    rec = [r for r in log_records(out) if "loss" in r]
    assert [r["iter"] for r in rec] == [1]
    lr = rec[0]["lr"]
    assert lr == pytest.approx(S["learning_rate"] / (S["warmup_iters"] + 1), rel=1e-12)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the run (OMP_NUM_THREADS=1): the same sums in the same order
    try:
        config = W.Config(**ck["model_args"])
        data = W.load_data(synth_dir, config)
        torch.manual_seed(seed)
        model = W.Model(config).train()
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        micro_losses = []
        for micro in range(accum):
            rng = np.random.default_rng([seed, 0, 0, micro])
            dropout_seed = np.random.SeedSequence([seed, 2, 0, micro]).generate_state(1)[0]
            torch.manual_seed(int(dropout_seed))
            batch = W.get_batch(data, "train", S["batch_size"], rng)
            _, loss = model(**batch)
            (loss / accum).backward()
            micro_losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    assert rec[0]["loss"] == pytest.approx(sum(micro_losses) / accum, rel=1e-5)
    names = [n for n, p in model.named_parameters()]
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    norm = torch.sqrt(sum(g.double().pow(2).sum() for g in grads.values())).item()
    if grad_clip > 0:
        assert norm > 3 * grad_clip, norm  # the clip binds
        grads = {n: g * (grad_clip / (norm + 1e-6)) for n, g in grads.items()}
    # train.py's optimizer state: decayed tensors (dim >= 2) first, then the others, in
    # named_parameters order
    order = [n for n in names if grads[n].dim() >= 2] + [n for n in names if grads[n].dim() < 2]
    state = ck["optimizer"]["state"]
    assert sorted(state) == list(range(len(order)))
    b1, b2, wd, eps = S["beta1"], S["beta2"], S["weight_decay"], 1e-8
    for i, n in enumerate(order):
        g = grads[n]
        torch.testing.assert_close(state[i]["exp_avg"], (1 - b1) * g, rtol=1e-4, atol=1e-9,
                                   msg=lambda m: f"{n}: {m}")
        torch.testing.assert_close(state[i]["exp_avg_sq"], (1 - b2) * g * g, rtol=1e-3, atol=1e-14,
                                   msg=lambda m: f"{n}: {m}")
        decay = wd if g.dim() >= 2 else 0.0
        expected = start[n] * (1 - lr * decay) - lr * g / (g.abs() + eps)
        torch.testing.assert_close(ck["model"][n], expected, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{n}: {m}")

# -----------------------------------------------------------------------------
# sample.py's input clip

def test_read_clip_is_the_clips_frames_and_refuses_a_clip_past_the_end(synth_dir, capsys):
    """sample.read_clip(split, i): clip i's codes and mel frames, read here straight from
    {split}_codes.bin / {split}_mel.bin at the offset and length its clips.jsonl line gives; a clip
    number past the last (or negative) is a one-line failure naming the clips there are, not a
    traceback."""
    import sample as S
    meta = json.load(open(os.path.join(synth_dir, "meta.json")))
    clips = [json.loads(l) for l in open(os.path.join(synth_dir, "val_clips.jsonl")) if l.strip()]
    codes = np.fromfile(os.path.join(synth_dir, "val_codes.bin"),
                        dtype=np.uint16).reshape(-1, meta["n_q"])
    mel = np.fromfile(os.path.join(synth_dir, "val_mel.bin"),
                      dtype=np.float16).reshape(-1, meta["n_mels"])
    for i in (0, 1, len(clips) - 1):
        clip, info = S.read_clip(synth_dir, "val", i)
        s, n = clips[i]["offset"], clips[i]["frames"]
        assert info == clips[i]
        assert np.array_equal(clip["codes"].numpy(), codes[s:s + n].astype(np.int64))
        assert np.array_equal(clip["mel"].numpy(), mel[s:s + n].astype(np.float32))
    for bad in (len(clips), -1):
        with pytest.raises(SystemExit) as e:
            S.read_clip(synth_dir, "val", bad)
        assert e.value.code == 2
        assert f"--clip={bad}: " in capsys.readouterr().err

def test_read_clip_of_an_empty_split_says_it_has_no_clips(tmp_path, capsys):
    """A split prepared empty (--val_percent=0, one clip): one line saying so and what to try,
    not "has clips 0..-1"."""
    import sample as S
    (tmp_path / "meta.json").write_text(json.dumps({"sample_rate": 24000, "frame_rate": 75,
                                                    "n_q": 8, "n_mels": 64}))
    (tmp_path / "val_clips.jsonl").write_text("")
    with pytest.raises(SystemExit):
        S.read_clip(str(tmp_path), "val", 0)
    err = capsys.readouterr().err
    assert "--split=val: " in err and "has no clips" in err and "0..-1" not in err, err

def test_read_clip_names_a_missing_or_cut_array(synth_dir, tmp_path, capsys):
    """A prepared array that is missing, cut short of the clip's rows or cut mid-row is a one-line
    failure naming the file (numpy's errors, or a clip of 0 frames handed on, before)."""
    import shutil
    import sample as S
    for name in ("meta.json", "val_clips.jsonl", "val_codes.bin"):
        shutil.copy(os.path.join(synth_dir, name), tmp_path / name)
    clips = [json.loads(l) for l in open(tmp_path / "val_clips.jsonl") if l.strip()]
    mel = open(os.path.join(synth_dir, "val_mel.bin"), "rb").read()
    last = len(clips) - 1
    for content, said in ((None, "not found"), (mel[:len(mel) // 2], "the file is cut"),
                          (mel[:-1], "and a part")):
        if content is not None:
            (tmp_path / "val_mel.bin").write_bytes(content)
        with pytest.raises(SystemExit):
            S.read_clip(str(tmp_path), "val", last)
        err = capsys.readouterr().err
        assert str(tmp_path / "val_mel.bin") in err and said in err, err
    # a clip list cut mid-line: sample.py's read_clip and train.py's check (train.py and eval.py
    # read the data through it) name the file and the line (a JSONDecodeError naming none, before)
    (tmp_path / "val_mel.bin").write_bytes(mel)
    text = (tmp_path / "val_clips.jsonl").read_text()
    (tmp_path / "val_clips.jsonl").write_text(text[:text.index("\n") + 40])
    with pytest.raises(SystemExit):
        S.read_clip(str(tmp_path), "val", 0)
    err = capsys.readouterr().err
    assert f"{tmp_path / 'val_clips.jsonl'}: line 2 is not JSON" in err, err
    with pytest.raises(ValueError, match="val_clips.jsonl line 2 is not JSON"):
        train.check_arrays(str(tmp_path))

def test_read_clip_reads_whisper_features_at_their_own_offset(tmp_path):
    """Data prepared with --whisper_mel: read_clip gives a clip's Whisper features from
    {split}_wmel.bin at its woffset, wframes rows of whisper_mel's n_mels (100 frames/s: not the
    mel's offset and frames), next to its mel."""
    import sample as S
    rng = np.random.default_rng(0)
    clips = [{"id": "a", "kind": "speech", "duration": 0.4, "offset": 0, "frames": 30,
              "woffset": 0, "wframes": 40},
             {"id": "b", "kind": "speech", "duration": 0.3, "offset": 30, "frames": 23,
              "woffset": 40, "wframes": 30}]
    meta = {"sample_rate": 24000, "frame_rate": 75, "n_q": 8, "n_mels": 16, "codec": None,
            "whisper_mel": {"n_mels": 80, "frame_rate": 100, "sample_rate": 16000}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "val_clips.jsonl").write_text("".join(json.dumps(c) + "\n" for c in clips))
    mel = rng.standard_normal((53, 16)).astype(np.float16)
    wmel = rng.standard_normal((70, 80)).astype(np.float16)
    mel.tofile(tmp_path / "val_mel.bin")
    wmel.tofile(tmp_path / "val_wmel.bin")
    clip, info = S.read_clip(str(tmp_path), "val", 1)
    assert info["id"] == "b" and "codes" not in clip
    assert np.array_equal(clip["mel"].numpy(), mel[30:53].astype(np.float32))
    assert np.array_equal(clip["wmel"].numpy(), wmel[40:70].astype(np.float32))

def test_write_wav_leaves_the_file_there_whole_when_writing_fails(tmp_path, monkeypatch):
    """write_wav writes a temporary file and renames it: a write that fails part-way (a full disk)
    leaves a wav already at the path as it was; one that succeeds replaces it, 16-bit, clipped to
    [-1, 1], with no temporary file left."""
    import sample as S
    path = str(tmp_path / "out.wav")
    sf.write(path, np.zeros(100, dtype=np.float32), 24000, subtype="PCM_16")
    before = open(path, "rb").read()

    def fails(file, *args, **kw):
        with open(file, "wb") as f:
            f.write(b"RIFF and half a header")
        raise RuntimeError("No space left on device")
    monkeypatch.setattr(sf, "write", fails)
    with pytest.raises(RuntimeError):
        S.write_wav(path, np.ones(50), 24000)
    assert open(path, "rb").read() == before
    monkeypatch.undo()
    S.write_wav(path, np.array([0.5, 2.0, -3.0]), 24000)
    x, sr = sf.read(path, dtype="float32")
    assert sr == 24000 and np.allclose(x, [0.5, 1.0, -1.0], atol=1 / 32768)
    assert not os.path.exists(path + ".tmp")

def test_write_text_leaves_the_file_there_whole_when_writing_fails(tmp_path, monkeypatch):
    """write_text (sample.py's .txt answer) writes a temporary file and renames it: a write that
    fails part-way leaves a file already at the path as it was; one that succeeds replaces it, in a
    folder made for it, with no temporary file left."""
    import sample as S
    path = str(tmp_path / "answer.txt")
    S.write_text(path, "the old answer")
    real_open = open

    class HalfWritten:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[:3])
            raise OSError("No space left on device")
    monkeypatch.setattr(S, "open", lambda file, mode="r", *a, **k: HalfWritten(
        real_open(file, mode, *a, **k)) if "w" in mode else real_open(file, mode, *a, **k),
        raising=False)  # write_text's own name lookup, not every open of the process
    with pytest.raises(OSError):
        S.write_text(path, "a new answer")
    monkeypatch.undo()
    assert open(path).read() == "the old answer\n"
    S.write_text(path, "a new answer")
    deeper = str(tmp_path / "new" / "answer.txt")
    S.write_text(deeper, "in a new folder")
    assert open(path).read() == "a new answer\n" and open(deeper).read() == "in a new folder\n"
    assert sorted(os.listdir(tmp_path)) == ["answer.txt", "new"]

def salmonn_checkpoint(out, data_dir, **kw):
    """A tiny untrained SALMONN stage-1 checkpoint in out/ckpt.pt, in train.py's format (its
    tokenizer the data's corpus BPE), for sample.py to read."""
    from dataclasses import asdict
    import torch
    import salmonn
    torch.manual_seed(0)
    cfg = salmonn.SALMONNConfig(**{
        "vocab_size": tokenizer.load_tokenizer(data_dir, "corpus").n_vocab, "n_mels": 64,
        "speech_n_layer": 1, "speech_n_head": 2, "speech_n_embd": 32, "beats_n_layer": 1,
        "beats_n_head": 2, "beats_n_embd": 16, "qformer_n_layer": 1, "qformer_n_head": 2,
        "qformer_n_embd": 24, "window_frames": 4, "llm_n_layer": 1, "llm_n_head": 2,
        "llm_n_embd": 32, "llm_block_size": 128, "lora_rank": 4, **kw})
    os.makedirs(out)
    torch.save({"model": salmonn.SALMONN(cfg).state_dict(), "model_name": "salmonn",
                "model_args": asdict(cfg), "iter_num": 0, "config": {"data_dir": data_dir}},
               os.path.join(out, "ckpt.pt"))

def test_sample_gives_a_whisper_features_model_the_whisper_features_of_an_audio_file(synth_dir,
                                                                                    tmp_path):
    """sample.py --audio on a SALMONN checkpoint whose speech encoder reads Whisper's features
    (speech_features="whisper"): the file's Whisper features are computed next to its mel, and the
    model answers."""
    out = tmp_path / "run"
    salmonn_checkpoint(out, synth_dir, speech_features="whisper", speech_n_mels=80,
                       speech_frame_rate=100.0)
    sf.write(tmp_path / "tone.wav", [0.3 * math.sin(i / 9) for i in range(12000)], 24000)
    p = sample(f"--out_dir={out}", f"--audio={tmp_path / 'tone.wav'}", "--beam=1",
               "--max_new_tokens=2")
    assert p.returncode == 0 and "input: " in p.stdout, p.stderr[-2000:]
    # the answer (greedy: deterministic) is the model's to the file's Whisper features, computed
    # here from the 24 kHz file (features made as if at another rate give another answer)
    import torch
    import salmonn
    from audio import load_audio, log_mel, whisper_log_mel
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    model = salmonn.SALMONN(salmonn.SALMONNConfig(**ck["model_args"]))
    model.load_state_dict(ck["model"])
    wav = load_audio(tmp_path / "tone.wav")
    inp = {"mel": torch.as_tensor(log_mel(wav)).float(),
           "wmel": torch.from_numpy(whisper_log_mel(wav, sr=24000))}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the sample.py above ran (its sums in the same order)
    try:
        text = salmonn.sample(model.eval(), tokenizer.load_tokenizer(synth_dir, "corpus"), inp,
                              None, beam=1, max_new_tokens=2)["text"]
    finally:
        torch.set_num_threads(threads)
    assert f"(the model's default; --prompt asks another)\n{text}\n(" in p.stdout, p.stdout

def test_sample_reads_the_split_asked_and_makes_an_out_folder_named_with_a_separator(synth_dir,
                                                                                  tmp_path):
    """sample.py --split=train --clip=1 answers about the train split's clip 1 (named in the input
    line); without --prompt it says which instruction the model took; --out naming a folder that
    does not exist yet, with a trailing separator, makes it and writes sample.txt there."""
    out = tmp_path / "run"
    salmonn_checkpoint(out, synth_dir)
    with open(os.path.join(synth_dir, "train_clips.jsonl")) as f:
        clip = [json.loads(line) for line in f if line.strip()][1]
    folder = tmp_path / "answers"
    p = sample(f"--out_dir={out}", "--split=train", "--clip=1", "--beam=1", "--max_new_tokens=2",
               f"--out={folder}{os.sep}")
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"input: train clip 1 ({clip['id']}, {clip['kind']}," in p.stdout, p.stdout
    assert "prompt: Describe the audio in one sentence. (the model's default" in p.stdout, p.stdout
    assert f"wrote {folder / 'sample.txt'}" in p.stdout
    # the file holds the answer printed (the line after the prompt's), not an empty one
    lines = p.stdout.splitlines()
    answer = lines[next(i for i, l in enumerate(lines) if l.startswith("prompt: ")) + 1]
    assert answer.strip() and (folder / "sample.txt").read_text() == answer + "\n", p.stdout

def test_help_prints_the_scripts_usage_and_settings_and_trains_nothing(tmp_path):
    """--help prints the docstring, then every setting of the script with its default (its block
    of settings), and does nothing else."""
    import importlib
    import configurator
    for script, first in (("train.py", "Training script"), ("sample.py", "Sample from"),
                          ("eval.py", "Compare trained checkpoints")):
        p = run(["--help", f"--out_dir={tmp_path}"], cmd=[sys.executable, script])
        assert p.stdout.startswith(first), p.stdout
        module = importlib.import_module(script[:-3])
        settings = getattr(module, "TRAIN_DEFAULTS", None) or configurator.defaults(vars(module))
        shown = {line.split("=")[0].strip() for line in p.stdout.splitlines() if " = " in line}
        assert settings and set(settings) <= shown, set(settings) - shown
        assert not list(tmp_path.iterdir())
    # sample.py's and eval.py's: each model file's options passed on, with their defaults
    import pengi
    import whisper_gpt
    p = run(["--help"], cmd=[sys.executable, "sample.py"])
    assert f"whisper_gpt: max_new_tokens={whisper_gpt.SAMPLE_OPTS['max_new_tokens']}" in p.stdout
    shown = p.stdout.split("The model file's options")[1]
    assert "seed" not in shown and "lora_scale (unset)" in shown  # sample.py's own --seed
    p = run(["--help"], cmd=[sys.executable, "eval.py"])
    assert f"pengi: max_clips={pengi.EVAL_OPTS['max_clips']}" in p.stdout
    p = run(["config/whisper_gpt_quick.py", "-h"])
    assert "Config" in p.stdout and p.stderr == "", p.stderr
    # and the settings of the model the arguments name: a config file's, or --model's (last wins)
    p = run(["config/pengi_synth.py", "--help"])
    assert "class PengiConfig" in p.stdout and "prefix_len: int" in p.stdout, p.stdout[-2000:]
    p = run(["config/pengi_synth.py", "--model=salmonn", "--help"])
    assert "class SALMONNConfig" in p.stdout and "class PengiConfig" not in p.stdout
    for bad in ("--model=", "--model=os", "--model=nope", "--model=../x", "--model=configurator"):
        p = run([bad, "--help"])  # not a model file: said, no traceback
        assert p.returncode == 0 and "not one of the model files" in p.stdout, (bad, p.stderr)
    # a config file's model as train.py reads it: the last assignment, whatever its form
    (tmp_path / "c.py").write_text('model = "salmonn"\nm = "pengi"\nmodel = m\n')
    assert "class PengiConfig" in run([str(tmp_path / "c.py"), "--help"]).stdout
    # read by a pager or `head` that stops early: the help ends quietly, as Unix tools do (a
    # 4 KB pipe, smaller than the help, so the script is still writing when the reader goes)
    import fcntl
    import subprocess
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, 1031, 4096)  # F_SETPIPE_SZ, before anything is written
    proc = subprocess.Popen([sys.executable, "train.py", "--help"], cwd=ROOT, stdout=write_end,
                            stderr=subprocess.PIPE)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        assert reader.readline().startswith(b"Training script")
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) in (0, -13) and "Error" not in err, err  # -13: SIGPIPE

def test_a_model_field_left_unset_counts_as_its_default():
    from whisper_gpt import WhisperGPTConfig
    assert WhisperGPTConfig().bias is False
    run_a = {"model": "whisper_gpt", "n_layer": 3}
    same = {"model": "whisper_gpt", "n_layer": 3, "bias": False}  # the default, given
    other = {"model": "whisper_gpt", "n_layer": 3, "bias": True}
    assert train.changed_settings(same, run_a) == [] and train.changed_settings({}, {}) == []
    assert train.changed_settings(other, run_a) == ["bias"]
    assert train.describe_changes(["bias"], other, run_a) == "bias=False there, True here"
    # runs of two model files: nothing is filled in
    assert train.changed_settings({"model": "pengi"}, {"model": "whisper_gpt"}) == ["model"]

def test_describe_changes_names_the_first_five_changed_settings():
    old = {k: 1 for k in "abcdef"}
    new = {k: 2 for k in "abcdef"}
    keys = train.changed_settings(new, old)
    assert keys == list("abcdef")
    assert train.describe_changes(keys, new, old) == \
        ", ".join(f"{k}=1 there, 2 here" for k in "abcde")

def test_a_bool_is_not_taken_for_an_int_setting(tmp_path, capsys):
    """An int setting takes an int, not True or False (a bool is an int to isinstance): from
    --key=value text and from a config file alike."""
    import configurator as K
    with pytest.raises(K.SettingsError, match="n_layer must be int, got bool True"):
        K.resolve([("n_layer", None, "True", "--n_layer=True")], {"n_layer": int})
    with pytest.raises(K.SettingsError, match="batch_size must be int, got bool False"):
        K.resolve([("batch_size", False, None, "c.py")], {"batch_size": int})
    cfg = tmp_path / "c.py"
    cfg.write_text("max_iters = True\n")
    with pytest.raises(SystemExit):
        train.load_settings([str(cfg)])
    assert f"{cfg}: max_iters must be int, got bool True" in capsys.readouterr().err
    assert K.resolve([("n_layer", None, "3", "--n_layer=3")], {"n_layer": int}) == \
        ({"n_layer": 3}, {})

def test_settings_of_how_a_run_executes_do_not_make_it_another_run():
    """A re-run may differ from the run in out_dir in how it executes (device, dtype, compile, DDP
    backend, logging, where it starts from as resume/overwrite/eval_only): check_rerun resumes or
    skips it rather than refusing it as a run with other settings. What it trains (a learning
    rate, the data, a model size) is another run."""
    base = {"model": "whisper_gpt", "learning_rate": 1e-3, "data_dir": "data/synth",
            "n_layer": 2, "device": "cuda", "dtype": "bfloat16", "compile": True,
            "backend": "nccl", "ddp_find_unused_parameters": False, "log_interval": 10,
            "wandb_log": False, "wandb_project": "p", "wandb_run_name": "r", "peak_flops": 0.0,
            "eval_only": False, "overwrite": False, "out_dir": "out/a"}
    other = {**base, "device": "cpu", "dtype": "float32", "compile": False, "backend": "gloo",
             "ddp_find_unused_parameters": True, "log_interval": 1, "wandb_log": True,
             "wandb_project": "q", "wandb_run_name": "s", "peak_flops": 1e12, "eval_only": True,
             "overwrite": True, "out_dir": "out/a/"}
    assert train.changed_settings(other, base) == []
    for key, value in (("learning_rate", 2e-3), ("data_dir", "data/other"), ("n_layer", 3)):
        assert train.changed_settings({**other, key: value}, base) == [key]

def test_save_atomic_flushes_to_the_disk_before_the_rename(tmp_path, monkeypatch):
    """save_atomic's promise against a power loss: the whole new file is fsync'ed (the temporary
    file, complete) before it is renamed over the old one."""
    import torch
    path = str(tmp_path / "ckpt.pt")
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_size))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.getsize(src)))
        return real_replace(src, dst)
    monkeypatch.setattr(train.os, "fsync", fsync)
    monkeypatch.setattr(train.os, "replace", replace)
    train.save_atomic({"x": torch.arange(1000)}, path)
    size = os.path.getsize(path)
    assert events == [("fsync", size), ("replace", size)], events

def test_decay_lr_false_keeps_the_learning_rate_constant(synth_dir, tmp_path):
    """decay_lr=False: every iteration steps at learning_rate itself, no warmup nor decay (a
    warmup over the 3 iterations, then a cosine decay, would otherwise apply), and no note that
    the run ends inside the warmup is printed."""
    out = str(tmp_path)
    p = run(["config/whisper_gpt_quick.py", f"--data_dir={synth_dir}", f"--out_dir={out}", *TINY,
             "--max_iters=3", "--warmup_iters=3", "--eval_interval=100", "--decay_lr=False",
             "--lr_decay_iters=0"])
    recs = log_records(out)
    logged = {r["iter"]: r["lr"] for r in recs if "lr" in r}
    assert logged == {1: 1e-2, 2: 1e-2, 3: 1e-2}, logged
    assert "ends inside the warmup" not in p.stdout

def test_evaluation_averages_an_odd_number_of_batches(synth_dir, tmp_path):
    """eval_iters=3: the logged train and val losses are the mean of the 3 batch losses (the full
    run's eval_iters=2 cannot tell a mean from a median), recomputed from the checkpoint."""
    out = str(tmp_path)
    run(["config/whisper_gpt_quick.py", f"--data_dir={synth_dir}", f"--out_dir={out}", *TINY,
         "--max_iters=1", "--eval_interval=1", "--eval_iters=3"])
    ck, each = eval_batch_losses(out, synth_dir)
    assert ck["config"]["eval_iters"] == 3 and len(each["val"]) == 3
    last = [r for r in log_records(out) if "val_loss" in r][-1]
    assert last["iter"] == 1
    for split in ("train", "val"):
        # the scenario: the mean is not the middle value
        assert abs(np.mean(each[split]) - np.median(each[split])) > 1e-4, each
        assert abs(last[f"{split}_loss"] - np.mean(each[split])) < 1e-5, (last, each)

def test_sample_reads_the_data_dir_given_and_writes_into_out_dir_by_default(full_run, synth_dir,
                                                                           tmp_path):
    """--data_dir wins over the data_dir the checkpoint records (here a folder that does not
    exist); with no --out an audio result is out_dir/sample.wav, its spectrogram
    out_dir/sample.png."""
    import torch
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ck = torch.load(os.path.join(full_run, "ckpt.pt"), weights_only=True)
    ck["config"]["data_dir"] = str(tmp_path / "gone")
    torch.save(ck, run_dir / "ckpt.pt")
    p = sample(f"--out_dir={run_dir}", f"--data_dir={synth_dir}", "--clip=1", "--max_new_tokens=2")
    assert p.returncode == 0, p.stderr[-2000:]
    assert f", data {synth_dir}\n" in p.stdout, p.stdout
    assert f"wrote {run_dir / 'sample.wav'}" in p.stdout, p.stdout
    assert sorted(os.listdir(run_dir)) == ["ckpt.pt", "sample.png", "sample.wav"]
    assert sf.read(run_dir / "sample.wav")[0].size > 2 * 320
    # --ckpt names the checkpoint instead of --out_dir (a run's folder given there: its ckpt.pt)
    p = sample(f"--ckpt={run_dir}", f"--data_dir={synth_dir}", "--clip=1", "--max_new_tokens=2",
               f"--out={tmp_path / 'y.wav'}")
    assert p.returncode == 0 and f"from {run_dir / 'ckpt.pt'} (iter 8)" in p.stdout, \
        p.stdout + p.stderr[-2000:]
    assert (tmp_path / "y.wav").exists()

def test_a_run_from_other_weights_keeps_its_start_through_a_resume(full_run, synth_dir, tmp_path):
    """A run started from another run's checkpoint and resumed (init_from=resume) still records
    that checkpoint as its start, so the command that started it, given again, is the same run
    (finished), not another one."""
    import torch
    start = os.path.join(full_run, "ckpt.pt")
    base = ["config/whisper_gpt_quick.py", f"--data_dir={synth_dir}", f"--out_dir={tmp_path}",
            *TINY]
    run(base + ["--max_iters=2", f"--init_from={start}"])
    run(base + ["--max_iters=4", "--init_from=resume"])
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["config"]["init_from"] == start
    p = run(base + ["--max_iters=4", f"--init_from={start}"])
    assert "this run is finished (iter 4)" in p.stdout, p.stdout

def test_a_resumed_runs_start_counts_as_the_best_so_far_under_its_own_eval_settings(synth_dir,
                                                                                    tmp_path):
    """Resumed with eval_iters=1 (another measure than the run's 2) and a learning rate of 0, the
    weights never change: the start's val loss, measured anew at iteration 4, is the best so far,
    so the identical weights at 8 are no improvement and best-only saving writes nothing, even
    where the new measure is lower than the checkpoint's best_val_loss of the old one."""
    import torch
    out = str(tmp_path)
    cmd = ["config/whisper_gpt_quick.py", f"--data_dir={synth_dir}", f"--out_dir={out}", *TINY]
    run(cmd + ["--max_iters=4"])
    best = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["best_val_loss"]
    p = run(cmd + ["--max_iters=8", "--init_from=resume", "--eval_iters=1", "--learning_rate=0",
                   "--min_lr=0", "--always_save_checkpoint=False"])
    _, val = losses(out)
    assert val[8] == val[4] < best, (val, best)  # the scenario
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ck["iter_num"] == 4 and ck["end_iter"] == 8 and "saved" not in p.stdout, p.stdout
    assert f"best val loss {val[4]:.4f}" in p.stdout, p.stdout

def test_sample_takes_an_audio_file_over_the_codec_limit_for_a_text_model(synth_dir, tmp_path):
    """MAX_CLIP_SECONDS limits what is encoded with the codec (a model of codes): a text model
    reads the file's mel only, so a longer file is its input all the same."""
    from audio import MAX_CLIP_SECONDS
    out = tmp_path / "run"
    # room for the audio tokens of the file's first 30 s (max_audio_frames)
    salmonn_checkpoint(out, synth_dir, llm_block_size=512)
    sf.write(tmp_path / "long.wav", 0.1 * np.sin(np.arange((MAX_CLIP_SECONDS + 1) * 8000) / 7.0)
             .astype(np.float32), 8000)
    p = sample(f"--out_dir={out}", f"--audio={tmp_path / 'long.wav'}", "--beam=1",
               "--max_new_tokens=2")
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"input: {tmp_path / 'long.wav'}, {MAX_CLIP_SECONDS + 1:.2f} s" in p.stdout, p.stdout
