"""
Prepare audio + text data for the three models: 24 kHz audio -> EnCodec codes and an aligned log-mel
spectrogram (one mel frame per codec frame), plus captions / transcripts / labels / QA as text.

    python prepare.py                                   # built-in offline corpus -> data/synth/
    python prepare.py --clips=3000 --name=synth3k      # a bigger one -> data/synth3k/
    python prepare.py --dataset=librispeech --src=LibriSpeech/dev-clean --name=libri
    python prepare.py --dataset=folder --src=my_wavs --name=mine  # optional manifest.csv / .jsonl

The codec is the pretrained EnCodec 24 kHz (--codec_dir, the torch hub cache, or a download), else
an offline one with its architecture, set up as a block DCT and fitted to the corpus (--offline
skips the download; see codec.py).

Output in data/<name>/ (see docs/data.md): meta.json, {split}_codes.bin (uint16 [frames, n_q]),
{split}_mel.bin (float16 [frames, n_mels]), {split}_clips.jsonl and the corpus BPE
(tokenizer.tiktoken). The offline codec adds codec.pt, and codec.png when fitted on synth with
--codec_report=1. Read the .bin files with np.memmap(path, dtype, mode="r").reshape(-1, n_q or
n_mels).

--whisper_mel adds {split}_wmel.bin (float16 [frames, 80]): OpenAI Whisper's own log-mel (16 kHz,
100 frames/s), each clip's at its "woffset" / "wframes" in {split}_clips.jsonl. --codebook0_mel
adds {split}_mel_c0.bin, the log-mel of codebook 0 decoded alone; it is made from the codes, so it
can be added to a finished directory. --no_codes loads no codec and writes no {split}_codes.bin:
the mel and the text only, all SALMONN and Pengi read, ~15x faster.

The rest is elsewhere: the data contract and the codec at run time in audio.py, fitting the offline
codec in codec.py, the built-in corpus in synth.py, the corpus BPE in tokenizer.py.
"""
import math
import os
import re
import sys
import csv
import io
import json
import time
import shutil
import hashlib
import itertools
import unicodedata
import argparse
from pathlib import Path
from collections import Counter

import numpy as np
import torch
from tqdm import tqdm

from audio import (AUDIO_EXTS, BANDWIDTH, CODEBOOK_SIZE, CODEC_FILE, F_MAX, F_MIN, FRAME_RATE,
                   HOP, LOG_FLOOR, MAX_CLIP_SECONDS, MEL_CENTER, MEL_LOOKAHEAD, N_FFT, N_MELS, N_Q,
                   SAMPLE_RATE, WHISPER_FRAME_RATE, WHISPER_N_MELS, WHISPER_SR, BadAudio, codec_id,
                   decode, encode_emb, get_pretrained_codec, load_audio, load_codec, log_mel,
                   offline_codec, plot_mels, quantize, whisper_log_mel, whisper_mel_filters)
from codec import (calibrate, codec_probes, codec_report, codec_state, fit_codebooks, train_codec,
                   tune_decoder)
from synth import KIND_MIX, speech_problem, synth_clip
from tokenizer import CORPUS_BPE_FILE, PROMPT_TEXT, EOT, save_ranks, train_bpe

# -----------------------------------------------------------------------------
# real datasets: listing items (path + text fields) with every problem reported, not raised

class InputProblems:
    """report(what, problem): each problem with the input is one line, counted for the summary at
    the end; with --strict, an error. Muted while the offline codec reads clips ahead of pass 1, so
    that each problem is reported once, by pass 1."""

    def __init__(self, strict):
        self.strict, self.muted, self.counts = strict, False, Counter()

    def __call__(self, what, problem, kept=False):
        """kept: the input is used all the same, only a part of it is not. That is a warning, not
        counted as a skipped input."""
        if self.muted:
            return
        if self.strict:
            sys.exit(f"error: {what}: {problem} (--strict)")
        if kept:
            tqdm.write(f"warning: {what}: {problem}")
            return
        self.counts[problem.split(" (")[0].split(":")[0]] += 1  # by kind: before any "(" or ":"
        tqdm.write(f"skipping {what}: {problem}")

def librispeech_items(src, report):
    items, seen, ids = [], set(), set()
    for trans in sorted(Path(src).rglob("*.trans.txt")):
        try:  # utf-8-sig: an editor's byte-order mark is not part of the first clip's ID
            lines = trans.read_bytes().decode("utf-8-sig").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            why = ("not UTF-8" if isinstance(e, UnicodeDecodeError) else
                   f"unreadable ({e.strerror or type(e).__name__})")
            report(str(trans), f"{why}: a transcript file, its clips skipped")
            chapter = trans.name[:-len(".trans.txt")]
            seen.update(f.resolve() for f in trans.parent.glob(f"{chapter}-*"))  # said: once
            continue
        for line in lines:
            if not line.strip():
                continue
            uid, text = (line.split(None, 1) + [""])[:2]  # the ID, then a space or a tab
            audio = trans.parent / f"{uid}.flac"
            if uid in ids:
                report(str(audio), f"listed again in a transcript ({trans.name}); the first line "
                                   f"is kept", kept=True)
                continue
            ids.add(uid)
            seen.add(audio.resolve())
            if not audio.exists():
                report(str(audio), f"missing file, listed in a transcript ({trans.name})")
                continue
            if not text.strip():
                report(str(audio), "missing transcript (empty line)")
                continue
            spk, chap = (uid.split("-") + ["", ""])[:2]
            t = " ".join(text.split()).lower()
            items.append(dict(path=str(audio), id=uid, source=f"librispeech:{uid}", kind="speech",
                              transcript=t,
                              caption=None, description=None,
                              labels={"class": "speech", "speaker": spk, "chapter": chap},
                              qa=[{"q": "what does the speaker say?", "a": t}]))
    for f in sorted(Path(src).rglob("*")):
        if f.is_file() and f.suffix.lower() in AUDIO_EXTS and f.resolve() not in seen:
            report(str(f), "missing transcript (no line in any .trans.txt)")
    if not items and not list(Path(src).rglob("*.trans.txt")):
        report(str(src), "no .trans.txt transcript files found")
    return items

# the manifest fields read: the file's, its text's, its question-answer pairs' (and caption_N)
FILE_FIELDS = ("file", "path", "audio", "file_name", "filename")
TEXT_FIELDS = ("caption", "transcript", "label", "description")
KNOWN_FIELDS = FILE_FIELDS + TEXT_FIELDS + ("question", "answer", "qa")

def manifest_text(path):
    """A manifest's text, which must be UTF-8 (a spreadsheet's "CSV UTF-8" starts with a byte-order
    mark, dropped): another encoding's letters would become other text, or miss their files."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        sys.exit(f"error: {path}: not UTF-8 (line {line}); save it as UTF-8 (a spreadsheet's "
                 f"\"CSV UTF-8\")")

def same_name(path):
    """A path in one Unicode form (NFC): a name written decomposed (as macOS writes file names)
    and its composed spelling are one file name to a reader, not to the file system."""
    return Path(unicodedata.normalize("NFC", str(path)))

def read_manifest(src, report):
    """manifest.jsonl or manifest.csv rows -> {the file's resolved path: row dict}. Rows for the
    same file are merged; "name" keeps the path as written."""
    rows = []
    mj, mc = Path(src) / "manifest.jsonl", Path(src) / "manifest.csv"
    if mj.exists():
        for ln, line in enumerate(manifest_text(mj).splitlines(), 1):
            if line.strip():
                try:
                    rows.append((f"{mj.name}:{ln}", json.loads(line)))
                except json.JSONDecodeError as e:
                    report(f"{mj}:{ln}", f"bad JSON line ({e.msg})")
    elif mc.exists():
        # strict: an unclosed quote is an error, not the rows after it silently lost
        reader, read = csv.DictReader(io.StringIO(manifest_text(mc), newline=""), strict=True), 1
        try:
            for row in reader:
                read = reader.line_num
                rows.append((f"{mc.name}:{read}", row))
        except csv.Error as e:
            sys.exit(f"error: {mc}: not CSV after line {read} ({e}); check its quotes")
        header = reader.fieldnames or []  # (an empty file: no rows)
        if header and not set(header) & set(FILE_FIELDS):  # every row would lose its file
            sys.exit(f"error: {mc}: its first line {','.join(header)!r} names no file column "
                     f"({', '.join(FILE_FIELDS)}); a manifest.csv is comma-separated, under a "
                     f"header line")
    else:
        return None
    out, ignored = {}, set()
    for where, row in rows:
        if not isinstance(row, dict):
            report(f"{src}/{where}", "manifest row is not an object ({\"file\": ..., ...})")
            continue
        # csv's key for the fields past the header's: text there means the columns have shifted
        # (empty ones are a trailing comma)
        if any(v.strip() for v in row.pop(None, [])):
            report(f"{src}/{where}", f"manifest row has more fields than its header "
                                     f"({len(row)}): quote a field that holds a comma")
            continue
        name = next((row[k] for k in FILE_FIELDS if row.get(k)), None)
        if not isinstance(name, str) or not name:
            report(f"{src}/{where}", "manifest row has no 'file' field (a path, as text)")
            continue
        # keyed by the file itself: "./a.wav", "sub/../a.wav" and an absolute path name one file
        r = out.setdefault(same_name((Path(src) / name).resolve()), {"qa": [], "name": name})
        # a list (AudioSet's labels of one clip) reads as "a, b", not as Python's "['a', 'b']"
        text = {k: (", ".join(map(str, v)) if isinstance(v, list) else str(v)).strip()
                for k, v in row.items() if v is not None and k != "qa"}
        for key in TEXT_FIELDS:  # a field of spaces is no text
            if text.get(key) and not r.get(key):
                r[key] = text[key]
        # Clotho's captions CSV: caption_1 ... caption_5 (the first one kept, as for repeated rows)
        numbered = sorted((k for k in row
                           if isinstance(k, str) and re.fullmatch(r"caption_\d+", k)),
                          key=lambda k: int(k.split("_")[1]))
        for k in numbered:
            if text.get(k) and not r.get("caption"):
                r["caption"] = text[k]
        unknown = {k for k in row if isinstance(k, str)} - set(KNOWN_FIELDS) - set(numbered)
        if unknown - ignored:
            ignored |= unknown
            print(f"note: {src}/{where}: column(s) {', '.join(sorted(map(repr, unknown)))} not "
                  f"read (known: {', '.join(KNOWN_FIELDS)})")
        if text.get("question") and text.get("answer"):
            r["qa"].append({"q": text["question"], "a": text["answer"]})
        elif text.get("question") or text.get("answer"):  # half a pair is no QA example: said
            has, lacks = (("a question", "answer") if text.get("question")
                          else ("an answer", "question"))
            report(f"{src}/{where}", f"manifest row has {has} but no {lacks}; the pair is "
                                     f"ignored", kept=True)
        qa = row.get("qa") or []
        if not isinstance(qa, list):
            report(f"{src}/{where}", "'qa' is not a list of question-answer objects "
                                     "({\"q\": ..., \"a\": ...}); the row's 'qa' ignored",
                   kept=True)
            qa = []
        for q in qa:
            pair = {k: str(q.get(k) or "").strip() for k in ("q", "a")} if isinstance(q, dict) \
                else {}
            if pair.get("q") and pair.get("a"):
                r["qa"].append(pair)
            else:  # said, as a lone question/answer field is: the pair would vanish unseen
                report(f"{src}/{where}", f"a 'qa' entry {json.dumps(q, ensure_ascii=False)[:60]} "
                                         f"lacks a \"q\" or an \"a\"; it is ignored", kept=True)
    return out

def folder_items(src, report):
    src = Path(src)
    manifest = read_manifest(src, report)
    items = []
    files = sorted(f for f in src.rglob("*") if f.is_file())
    listed = {same_name(f.resolve()) for f in files}
    for f, r in (manifest or {}).items():
        if f not in listed and not f.is_file():
            hint = " (write its path with /)" if "\\" in r["name"] else ""
            report(str(src / r["name"]), f"named in the manifest but the file is missing{hint}")
        elif f not in listed:
            report(str(f), "named in the manifest but outside --src (only the files under it "
                           "are read)")
    for f in files:
        rel = f.relative_to(src).as_posix()
        if f.name in ("manifest.csv", "manifest.jsonl") and f.parent == src:
            continue
        key = same_name(f.resolve())  # the file as the manifest's rows are keyed
        if any(part.startswith(".") for part in f.relative_to(src).parts):
            # hidden: .DS_Store, macOS's ._ copies beside each file, a .git folder
            if key in (manifest or {}):
                report(str(f), "hidden (a name starting with .), not read, though the manifest "
                               "names it")
            continue
        if f.suffix.lower() not in AUDIO_EXTS:
            report(str(f), f"not an audio file (extension '{f.suffix or 'none'}')")
            continue
        r = (manifest or {}).get(key, {"qa": []})
        label = r.get("label") or (f.parent.name if f.parent != src else "sound")
        qa = list(r.get("qa", []))
        if r.get("label"):
            qa.append({"q": "what sound is this?", "a": r["label"]})
        items.append(dict(path=str(f), id=rel, source=f"folder:{rel}",
                          kind="file" if not r.get("transcript") else "speech",
                          transcript=r.get("transcript"), caption=r.get("caption"),
                          description=r.get("description"), labels={"class": label}, qa=qa))
    return items

# -----------------------------------------------------------------------------
# the split, staged output files, codebook-0 mels

def is_val(clip_id, val_percent):
    """Deterministic split: a clip goes to val by a hash of its id (stable when the corpus
    grows)."""
    return int(hashlib.md5(clip_id.encode()).hexdigest()[:8], 16) % 1000 < val_percent * 10

class Staging:
    """stage(name): where to write an output file, next to its final name; commit() renames them all
    into place in the order staged (main stages meta.json last). A run that fails leaves the
    previous output as it was."""

    def __init__(self, out):
        self.out, self.files = out, []

    def __call__(self, fname):
        tmp = self.out / f"{fname}.tmp{os.getpid()}"
        self.files.append((tmp, self.out / fname))
        return tmp

    def commit(self):
        (self.out / "meta.json").unlink(missing_ok=True)   # no meta.json: incomplete
        for tmp, path in self.files:
            os.replace(tmp, path)

def codebook0_mels(data_dir, quiet=False):
    """{split}_mel_c0.bin (float16 [frames, n_mels], aligned with the codes): the log-mel of each
    clip's codebook 0 decoded alone by the data's codec. Whisper-GPT's hybrid generates codebook 0
    only and computes this mel from it, so a hybrid trained on it (mel_source="codebook0") is
    trained on what it will see. Made from the stored codes; a split whose file exists is
    skipped."""
    data_dir = Path(data_dir)
    meta = json.loads((data_dir / "meta.json").read_text())
    codec = None
    for split in ("train", "val"):
        path = data_dir / f"{split}_mel_c0.bin"
        if path.exists():
            continue
        codec = codec or load_codec(data_dir)
        with open(data_dir / f"{split}_clips.jsonl") as f:
            clips = [json.loads(line) for line in f if line.strip()]
        frames = meta["splits"][split]["frames"]
        codes = np.memmap(data_dir / f"{split}_codes.bin", dtype=np.uint16, mode="r",
                          shape=(frames, meta["n_q"])) if frames else np.zeros((0, meta["n_q"]))
        mel = np.zeros((frames, meta["n_mels"]), np.float16)
        for c in tqdm(clips, unit="clip", desc=f"codebook-0 mel, {split}", disable=quiet):
            clip_codes = codes[c["offset"]:c["offset"] + c["frames"], :1].astype(np.int64)
            wav = decode(codec, clip_codes).numpy()
            mel[c["offset"]:c["offset"] + c["frames"]] = log_mel(wav)[:c["frames"]]
        tmp = Path(f"{path}.tmp{os.getpid()}")
        mel.tofile(tmp)
        os.replace(tmp, path)

# -----------------------------------------------------------------------------
# the pipeline's steps, in the order main takes them

def output_dir(args):
    """--out_dir, else data/NAME (--name, else the dataset's name)."""
    return Path(args.out_dir or os.path.join("data", args.name or args.dataset))

def check_args(args):
    """Checks that need no work: each bad argument stops the run with one line naming it."""
    synth = args.dataset == "synth"  # --clips and --max_seconds are the built-in corpus's
    if not synth and not args.src:
        sys.exit(f"error: --dataset={args.dataset} needs --src=DIR")
    for k in ("name", "out_dir"):  # an empty one would silently mean the default, data/NAME
        if getattr(args, k) == "":
            sys.exit(f"error: --{k}= is empty: name the output (default data/NAME, NAME the "
                     f"dataset's name)")
    if synth and args.clips < 1:
        sys.exit(f"error: --clips={args.clips}: must be at least 1")
    # at most what a real file may last: a clip is made, and encoded, whole (1e9 ran out of memory)
    if synth and not 1 <= args.max_seconds <= MAX_CLIP_SECONDS:
        sys.exit(f"error: --max_seconds={args.max_seconds:g}: must be 1 to {MAX_CLIP_SECONDS} (the "
                 f"corpus's shortest sounds last a second; a clip is made and encoded whole)")
    if not 0 <= args.val_percent <= 100:
        sys.exit(f"error: --val_percent={args.val_percent:g}: must be 0 to 100")
    if abs(args.val_percent * 10 - round(args.val_percent * 10)) > 1e-6:  # is_val's resolution
        sys.exit(f"error: --val_percent={args.val_percent:g}: must be a multiple of 0.1 (a clip's "
                 f"split is drawn per mille)")
    for k, least in (("codec_steps", 0), ("codec_tune_steps", 0), ("codec_clips", 1),
                     ("kmeans_frames", 1), ("kmeans_iters", 1), ("codec_report", 0)):
        if getattr(args, k) < least:
            sys.exit(f"error: --{k}={getattr(args, k)}: must be at least {least}")
    if not 0 < args.batch_seconds < math.inf:
        sys.exit(f"error: --batch_seconds={args.batch_seconds:g}: must be a finite number above 0")
    if args.seed < 0:
        sys.exit(f"error: --seed={args.seed}: must be 0 or more")
    if args.vocab_size < 256:
        sys.exit(f"error: --vocab_size={args.vocab_size}: must be at least 256 (the corpus BPE's "
                 f"256 bytes, then its merges)")
    if args.src and not Path(args.src).is_dir():
        sys.exit(f"error: --src={args.src}: not a directory")
    defaults = vars(get_args([]))
    built_in_only = [f"--{k}" for k in ("kinds", "clips", "max_seconds", "seed", "no_speech")
                     if getattr(args, k) != defaults[k]]
    if built_in_only and not synth:  # they would change nothing here, yet block a plain re-run
        sys.exit(f"error: {', '.join(built_in_only)} "
                 f"{'is' if len(built_in_only) == 1 else 'are'} for --dataset=synth (the built-in "
                 f"corpus), not {args.dataset}")
    if args.kinds and (unknown := set(args.kinds) - {k for k, _, _ in KIND_MIX}):
        what = ("an empty name" if unknown == {""} else
                f"unknown kind(s) {', '.join(repr(k) for k in sorted(unknown))}")
        sys.exit(f"error: --kinds={','.join(args.kinds)}: {what}; the corpus has "
                 f"{', '.join(k for k, _, _ in KIND_MIX)}")
    if args.no_speech and args.kinds == ["speech"]:
        sys.exit("error: --no_speech with --kinds=speech leaves no kind to make")
    if args.no_speech and args.kinds and "speech" in args.kinds:  # not one silently dropped
        sys.exit(f"error: --no_speech with --kinds={','.join(args.kinds)}: speech is one of the "
                 f"kinds asked for; leave it out of --kinds, or drop --no_speech")
    if args.no_codes:
        codec_args = [f"--{k}" for k in ("offline_codec", "codec_dir", "codec_from",
                                          "codec_steps", "codec_tune_steps", "codebook0_mel")
                      if getattr(args, k)]
        if codec_args:
            sys.exit(f"error: --no_codes stores no codes: {', '.join(codec_args)} would make them")
    if args.offline_codec and args.codec_dir:
        sys.exit(f"error: --offline_codec fits a codec of its own: --codec_dir={args.codec_dir} "
                 f"(the pretrained one) would not be read; give one or the other")
    if args.codec_from:
        fitting = [f"--{k}" for k in ("offline_codec", "codec_dir", "codec_steps",
                                       "codec_tune_steps") if getattr(args, k)]
        if fitting:
            sys.exit(f"error: --codec_from={args.codec_from} takes that data's codec as it is: "
                     f"{', '.join(fitting)} would make another one")
        if Path(args.codec_from).resolve() == output_dir(args).resolve():
            sys.exit(f"error: --codec_from={args.codec_from} is the output directory itself")
        try:
            codec_id(args.codec_from)
        except ValueError as e:
            sys.exit(f"error: --codec_from={args.codec_from}: {e}")

def check_out_dir(out, force):
    """Stop now if the output directory cannot be made, but do not make it yet: make_out_dir waits
    until there is something to write, so a run that stops before leaves no empty folder. A folder
    of other files (no meta.json, no work of a stopped run) is refused, as the outputs would
    replace those of the same names."""
    there = next((p for p in (out, *out.parents) if p.exists()), out)   # out, or where it would go
    if not there.is_dir():
        sys.exit(f"error: --out_dir={out}: a file is in the way of that folder")
    if there != out and not os.access(there, os.W_OK | os.X_OK):
        sys.exit(f"error: --out_dir={out}: cannot be made (no permission to write in {there})")
    if there == out and not force and not (out / "meta.json").exists() \
            and not list(out.glob(".work-*")):
        others = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
        if others:
            sys.exit(f"error: --out_dir={out}: holds {len(others)} file(s) that are not prepared "
                     f"data ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}): name "
                     f"an empty or new folder (--force writes there, replacing what has an "
                     f"output's name)")

def make_out_dir(out):
    """The output directory, made if need be and cleared of a crashed run's half-written files.
    Returns the folders made here, innermost first (see remove_empty)."""
    made = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        sys.exit(f"error: --out_dir={out}: a file is in the way of that folder")
    except OSError as e:
        sys.exit(f"error: --out_dir={out}: cannot be made ({e.strerror})")
    for stale in out.glob("*.tmp[0-9]*"):              # half-written files of a run that crashed
        # Staging's names: NAME.tmpPID; plot_mels writes its picture's through NAME.tmpPID.tmp.png
        if re.fullmatch(r".+\.tmp\d+(\.tmp\.png)?", stale.name):
            stale.unlink()
    return made

def remove_empty(dirs):
    """Remove those of dirs that are empty, in order: a run that stops before writing anything
    leaves no folder of its own behind (a non-empty one, say with chunks to resume from, stays)."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:                               # not empty, or not there
            pass

def drop_speech_if_unavailable(args):
    """Without the speech library, synth is built without speech; with --strict, the run stops.
    This sets args.no_speech, which is part of the arguments' hash, so it runs before hash_args:
    the same command is other arguments on a machine that has speech."""
    wants_speech = args.dataset == "synth" and not args.no_speech and (not args.kinds
                                                                       or "speech" in args.kinds)
    if wants_speech and (problem := speech_problem()):
        if args.strict:
            sys.exit(f"error: speech: {problem} (--strict)")
        if args.kinds == ["speech"]:
            sys.exit(f"error: --kinds=speech, but speech cannot be synthesised here ({problem})")
        print(f"speech: {problem}; building the corpus without speech")
        args.no_speech = True

# what only names the output's place, or changes nothing in it
PLACE_ARGS = ("name", "out_dir")
NOT_HASHED = ("force", "quiet", "strict", "codebook0_mel")

def hash_args(args, src_as_given=False):
    """The hash of the arguments that shape the output: a re-run with the same ones skips work.
    src_as_given: the hash of data prepared before --src was normalised."""
    key_args = {k: v for k, v in vars(args).items() if k not in NOT_HASHED}
    if args.src and not src_as_given:  # "src/" and "./src" name the folder "src" does
        key_args["src"] = os.path.normpath(args.src)
    # left out when off, so data prepared before these options existed keeps its hash
    if not args.whisper_mel:
        del key_args["whisper_mel"]
    if not args.kinds:
        del key_args["kinds"]
    if not args.no_codes:
        del key_args["no_codes"]
    if args.codec_from:                               # the codec itself, not where it lies
        key_args["codec_from"] = codec_id(args.codec_from)
    else:
        del key_args["codec_from"]
    # --name / --out_dir spelled as their defaults hash as if left out
    if args.name == args.dataset:
        key_args["name"] = None
    if args.out_dir and (Path(args.out_dir).resolve()
                         == Path("data", args.name or args.dataset).resolve()):
        key_args["out_dir"] = None
    return hashlib.md5(json.dumps(key_args, sort_keys=True).encode()).hexdigest()[:12]

# settings pass 1's encoded chunks do not depend on (batch_seconds: by float rounding only), so a
# re-run that changes only these resumes them (docs/data.md)
AFTER_PASS1 = ("batch_seconds", "kmeans_frames", "kmeans_iters", "vocab_size", "codec_tune_steps",
               "codec_report", "offline")

def work_hash(args):
    """The hash that names the work directory: hash_args's without AFTER_PASS1."""
    return hash_args(argparse.Namespace(**{**vars(args), **dict.fromkeys(AFTER_PASS1)}))

def output_files(meta):
    """The files a finished run wrote next to meta.json (the codebook-0 mels, made on request,
    aside)."""
    files = [f"{split}_{part}" for split in ("train", "val")
             for part in ("codes.bin", "mel.bin", "clips.jsonl")
             if part != "codes.bin" or meta.get("codec") is not None]
    if "whisper_mel" in meta:
        files += ["train_wmel.bin", "val_wmel.bin"]
    if not (meta.get("codec") or {}).get("pretrained", True):
        files.append(meta["codec"]["weights"])
    if (meta.get("tokenizer") or {}).get("file"):
        files.append(meta["tokenizer"]["file"])
    return files

def already_prepared(out, args, args_hash):
    """Whether out holds a finished run of these arguments (hashed to args_hash), also when the
    folder was moved or copied there. With a meta.json there, one line says which it is.
    Data prepared there with other arguments, or a meta.json that cannot be read, stops the run,
    as rebuilding would replace the data and the offline codec that runs trained on it read.
    --force rebuilds; a stopped rebuild with these arguments resumes."""
    meta_path = out / "meta.json"
    if args.force or not meta_path.exists():
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, OSError):  # not JSON, unreadable, a folder
        meta = None
    if not isinstance(meta, dict):
        # the arguments the data there was made with are unknown: rebuilding with others would
        # replace the data and its offline codec
        sys.exit(f"error: {meta_path} cannot be read as prepare.py's JSON, so the arguments of the "
                 f"data in {out} are unknown; rebuilding could replace the data, and the codec, "
                 f"that runs trained on it read: --force rebuilds it there")
    if meta.get("args_hash") in (args_hash, hash_args(args, src_as_given=True)):
        args_hash = meta["args_hash"]  # (the same data; an older spelling of --src)
    if meta.get("args_hash") != args_hash and not prepared_elsewhere(meta, args):
        if any(w.read_text() == args_hash for w in out.glob(".work-*/args_hash")):
            # a rebuild with exactly these arguments was started (--force) and stopped: resume it
            print(f"{out} holds data prepared with other arguments, and a rebuild with these that "
                  f"was stopped: resuming it")
            return False
        sys.exit(f"error: {out} holds data prepared with other arguments "
                 f"({changed_args(meta, args)}); rebuilding would replace the data, and the codec, "
                 f"that runs trained on it read: --force rebuilds it there, or name another output "
                 f"with --name or --out_dir")
    missing = [f for f in output_files(meta) if not (out / f).is_file()]
    # a codes or mel file of another size than its frames (cut short, say): train.py refuses it
    # with "prepare.py again", so that rebuilds
    sizes = {f"{split}_{part}": n["frames"] * meta[width] * 2  # uint16 codes, float16 mel
             for split, n in (meta.get("splits") or {}).items()
             for part, width in (("codes.bin", "n_q"), ("mel.bin", "n_mels"))}
    cut = [f for f in output_files(meta) if f not in missing and f in sizes
           and (out / f).stat().st_size != sizes[f]]
    wrong = []
    if missing:
        wrong.append(f"lacks {', '.join(missing)}")
    if cut:
        wrong.append(f"has {', '.join(cut)} of another size than its frames")
    if wrong:
        print(f"{out} was prepared with these arguments but {' and '.join(wrong)}: rebuilding")
        return False
    print(f"{out} is already prepared with these arguments (use --force to rebuild)")
    for work in out.glob(".work-*"):  # a finished run's work, left by a kill just after its data
        if (work / "args_hash").is_file() and (work / "args_hash").read_text() == args_hash:
            shutil.rmtree(work, ignore_errors=True)
    return True

def prepared_elsewhere(meta, args):
    """Whether meta records these arguments but for the output's place (--name, --out_dir): a
    prepared folder moved or copied, which is the same data."""
    stored = meta.get("args")
    if not isinstance(stored, dict):
        return False
    try:  # these arguments, written where that run wrote (or in the default place): its hash?
        places = ({k: stored[k] for k in PLACE_ARGS}, dict.fromkeys(PLACE_ARGS))
        return any(hash_args(argparse.Namespace(**{**vars(args), **place}))
                   == meta.get("args_hash") for place in places)
    except (KeyError, TypeError, ValueError):  # a meta.json of another make
        return False

def changed_args(meta, args):
    """The arguments that differ from those meta.json records, for the message that refuses."""
    stored = meta.get("args") if isinstance(meta.get("args"), dict) else {}
    changed = [f"--{k}={stored[k]} then, {v} now"
               + (" (set when speech cannot be synthesised)" if k == "no_speech" else "")
               for k, v in vars(args).items()
               if k in stored and k not in PLACE_ARGS + NOT_HASHED and stored[k] != v]
    if changed:
        return "; ".join(changed)
    if args.codec_from:
        return f"the codec at --codec_from={args.codec_from} has changed since"
    return "by its args_hash"

def check_whisper_mel(args):
    """--whisper_mel needs Whisper's mel filters: fail now, not after the codec has trained."""
    if args.whisper_mel:
        try:
            whisper_mel_filters()
        except FileNotFoundError as e:
            sys.exit(f"error: --whisper_mel: {e}")

# what fits the offline codec (nothing of them applies to the pretrained EnCodec)
OFFLINE_CODEC_ARGS = ("codec_steps", "codec_clips", "codec_tune_steps", "codec_report",
                      "kmeans_frames", "kmeans_iters")

def get_codec(args, out):
    """The codec and its record for meta.json: the pretrained EnCodec whenever it can be had, else
    the offline one (EnCodec's architecture, set up and fitted once the clips are known); with
    --codec_from, that data's codec as it is."""
    if args.codec_from:
        src = Path(args.codec_from)
        try:
            codec = load_codec(src)
        except (ValueError, OSError, RuntimeError) as e:   # RuntimeError: a bad download's hash
            sys.exit(f"error: --codec_from={src}: {e}")
        codec_info = {k: v for k, v in json.loads((src / "meta.json").read_text())["codec"].items()
                      if k != "report"}
        if "from" not in codec_info:                  # a copy of a copy names the first corpus
            codec_info["from"] = str(src)
            if "note" in codec_info:                  # the offline codec's says where it was fitted
                codec_info["note"] += (f"; fitted on the corpus of {src}, copied here by "
                                       f"--codec_from")
        print(f"codec: {codec_info['name']} of {src}, as it is ({codec_id(src)})")
        return codec, codec_info
    try:
        codec, weights = (None, None) if args.offline_codec else \
            get_pretrained_codec(args.codec_dir, offline=args.offline, strict=args.strict)
    except (FileNotFoundError, ValueError) as e:      # --codec_dir without usable weights
        sys.exit(f"error: {e}")
    if codec is not None:
        codec_info = {"name": "encodec_24khz", "pretrained": True,
                      "weights": str(weights.resolve()), "bandwidth": BANDWIDTH}
        print(f"codec: pretrained EnCodec 24 kHz from {weights}")
        defaults = vars(get_args([]))  # the offline codec's options, given: unused
        given = [f"--{k}" for k in OFFLINE_CODEC_ARGS if getattr(args, k) != defaults[k]]
        if given:
            print(f"note: {', '.join(given)} fit the offline codec; the pretrained EnCodec is used "
                  f"as it is (--offline_codec fits one instead)")
        return codec, codec_info
    codec = offline_codec()
    codec_info = {"name": "encodec_24khz-offline", "pretrained": False, "weights": "codec.pt",
                  "bandwidth": BANDWIDTH,
                  "note": "OFFLINE codec: EnCodec 24 kHz architecture set to a block DCT "
                          "(each 320-sample block's first 128 cosines, 0-4.8 kHz) and its inverse, "
                          "codebooks fitted by k-means on this corpus; not the pretrained "
                          "EnCodec, whose codes these are not"}
    if args.offline_codec:
        why = "--offline_codec was given: no pretrained weights looked for"
    else:
        why = f"pretrained weights not found{'' if args.offline else ' and not downloadable'}"
    print(f"codec: OFFLINE EnCodec ({why}): "
          f"EnCodec's architecture set to a block DCT below 4.8 kHz"
          f"{f' and trained {args.codec_steps} steps' if args.codec_steps else ''}, then "
          f"{N_Q} residual codebooks fitted on this corpus; written to {out / 'codec.pt'} with "
          f"the data")
    return codec, codec_info

def clip_list(args, report):
    """Returns (clips, n): clips(skip=()) is a generator function that yields (wav, info) for each
    clip, in a fixed order, whose id is not in skip; n is how many there are. Synth clips are made
    on the fly; others are read from the files, and each bad one is reported and left out."""
    if args.dataset == "synth":
        def clips(skip=()):
            for i in range(args.clips):
                if f"synth-{i:06d}" not in skip:
                    yield synth_clip(args.seed, i, args.max_seconds, speech=not args.no_speech,
                                     kinds=args.kinds)
        return clips, args.clips
    list_items = librispeech_items if args.dataset == "librispeech" else folder_items
    items = list_items(args.src, report)
    def clips(skip=()):
        for it in items:
            if it["id"] in skip:
                continue
            try:
                wav = load_audio(it["path"], None if args.no_codes else MAX_CLIP_SECONDS)
            except BadAudio as e:
                report(it["path"], e.reason)
                continue
            info = {k: v for k, v in it.items() if k != "path"}
            yield wav, info
    return clips, len(items)

def work_dir(out, work_key, codec_name, force):
    """The directory where a run keeps what a kill would lose, named by work_key (work_hash) and
    the codec: a re-run with both resumes from it. One that gets another codec, say the pretrained
    EnCodec once the network is back, starts anew."""
    work = out / f".work-{work_key}-{codec_name}"
    def stopped(w):  # what a kill leaves: encoded chunks, or the offline codec's training state
        return any(w.glob("chunk*.npz")) or (w / "codec_train.pt").exists()
    others = sorted(w.name for w in out.glob(".work-*") if w != work and stopped(w))
    if others:  # finish() removes them: said now, while the run can still be stopped
        resumed = not force and stopped(work)
        print(f"note: {out} also holds {len(others)} stopped run(s) of other arguments or another "
              f"codec ({', '.join(others)}); this run "
              f"{'resumes its own' if resumed else 'starts anew'} and removes them when it "
              f"finishes. To resume one of them instead, stop this run and repeat that run's "
              f"command")
    if force:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(exist_ok=True)
    return work

def start_offline_codec(codec, clips, input_problems, args, work):
    """The offline codec's analytic start (codec.dct_init), then, with --codec_steps, its learned
    parts trained on the train split's first clips (resumable, see train_codec). Returns those
    clips as {id: wav}, for tuning the decoder once the codebooks are fitted. It is empty when
    neither --codec_steps nor --codec_tune_steps needs them."""
    codec_wavs = {}
    if args.codec_steps or args.codec_tune_steps:
        input_problems.muted = not args.strict        # pass 1 reports each bad input, once
        for wav, info in clips():
            if not is_val(info["id"], args.val_percent):
                codec_wavs[info["id"]] = wav
            if len(codec_wavs) >= args.codec_clips:
                break
        if not codec_wavs:                            # a dataset all in val: what there is
            codec_wavs = {info["id"]: wav
                          for wav, info in itertools.islice(clips(), args.codec_clips)}
        input_problems.muted = False
        if not codec_wavs:                            # no usable clip: pass 1 says why
            return {}
    t0 = time.time()
    # also with --codec_steps=0: train_codec sets the analytic start, then takes no step
    train_codec(codec, list(codec_wavs.values()), args.codec_steps, ckpt=work / "codec_train.pt",
                quiet=args.quiet)
    if args.codec_steps:
        print(f"offline codec: trained {args.codec_steps} steps on {len(codec_wavs)} clips in "
              f"{time.time() - t0:.0f}s")
    return codec_wavs

# --- pass 1: audio -> encoder outputs + mel, in batches (the slow part), with partial results
# saved in chunks of CHUNK clips, so an interrupted run resumes where it stopped. Here an encoded
# clip is (info, emb, mel, wmel).

CHUNK = 128
# what a clip's record keeps (in the chunks, then {split}_clips.jsonl): its text and labels, not the
# synth makers' working fields (notes, onsets, sequence, unit, voice, mentioned)
STORED_FIELDS = ("id", "source", "kind", "transcript", "caption", "description", "labels", "qa")

def load_chunks(work, whisper_mel):
    """From the chunks in work: the clips an interrupted run had encoded, and the chunks' count."""
    done, paths = [], sorted(work.glob("chunk*[0-9].npz"))
    for path in paths:
        z = np.load(path)
        emb, mel, offs = z["emb"], z["mel"], np.concatenate([[0], np.cumsum(z["lens"])])
        # the work dir's name hashes --whisper_mel: its chunks have wmel exactly when asked
        if whisper_mel:
            wmel, woffs = z["wmel"], np.concatenate([[0], np.cumsum(z["wlens"])])
        for j, info in enumerate(json.loads(str(z["infos"]))):
            wm = wmel[woffs[j]:woffs[j + 1]] if whisper_mel else None
            done.append((info, emb[offs[j]:offs[j + 1]], mel[offs[j]:offs[j + 1]], wm))
    return done, len(paths)

def save_chunk(work, chunk_id, chunk, whisper_mel):
    """A chunk of encoded clips to work/chunk{chunk_id}.npz, written to a temporary file first."""
    infos, embs, mels, wmels = zip(*chunk)
    extra = {}
    if whisper_mel:                                   # its own frame counts (100/s, not 75/s)
        extra = dict(wmel=np.concatenate(wmels), wlens=np.array([len(w) for w in wmels], np.int64))
    tmp = work / f"chunk{chunk_id:05d}.tmp.npz"
    lens = np.array([len(e) for e in embs], np.int64)
    np.savez(tmp, emb=np.concatenate(embs), mel=np.concatenate(mels), lens=lens,
             infos=np.array(json.dumps(infos)), **extra)
    os.replace(tmp, work / f"chunk{chunk_id:05d}.npz")

def batches(chunk, budget):
    """A chunk's (wav, info) in batches of about budget samples, shortest first: less padding."""
    batch, samples = [], 0
    for b in sorted(chunk, key=lambda x: len(x[0])):
        batch.append(b)
        samples += len(b[0])
        if samples >= budget:
            yield batch
            batch, samples = [], 0
    if batch:
        yield batch

def encode_batch(codec, batch, whisper_mel):
    """A batch of (wav, info) -> its encoded clips: the info's stored fields and duration, the
    encoder's output (float32: codes must not depend on storage rounding), the mel (float16) and
    Whisper's features (None without --whisper_mel). Without a codec (--no_codes) the encoder's
    output is an empty (frames, 0) array."""
    out = []
    wavs = [w for w, _ in batch]
    embs = encode_emb(codec, wavs) if codec is not None else [None] * len(wavs)
    for (w, info), e in zip(batch, embs):
        m = log_mel(w)
        e = torch.zeros(len(m), 0) if e is None else e
        assert len(m) == len(e), (len(m), len(e))
        info = {k: v for k, v in info.items() if k in STORED_FIELDS}
        info["duration"] = round(len(w) / SAMPLE_RATE, 4)
        wm = whisper_log_mel(w).astype(np.float16) if whisper_mel else None
        out.append((info, e.numpy(), m.astype(np.float16), wm))
    return out

def encode_clips(codec, clips, n_total, args, work, t_start):
    """Pass 1 over every clip, resumed from the chunks in work. Returns infos, embs, mels and
    wmels (lists in the order of the clips' ids) and the seconds of audio: all, and those
    resumed."""
    done, n_chunks = load_chunks(work, args.whisper_mel)
    if n_chunks:
        print(f"resuming: {len(done)} clips already encoded in {n_chunks} chunks")
    # the resumed clips as the start, not as work done now (the rate and ETA are this run's)
    pbar = tqdm(total=n_total, initial=len(done), unit="clip", disable=args.quiet, desc="encode",
                smoothing=0.1)
    audio_seconds = resumed_seconds = sum((info["duration"] for info, *_ in done), 0.0)
    todo = clips(skip={info["id"] for info, *_ in done})
    while chunk := list(itertools.islice(todo, CHUNK)):
        encoded = []
        for batch in batches(chunk, int(args.batch_seconds * SAMPLE_RATE)):
            new = encode_batch(codec, batch, args.whisper_mel)
            # the stored (rounded) durations, added one by one as resumed ones are: one sum
            for info, *_ in new:
                audio_seconds += info["duration"]
            encoded += new
            pbar.update(len(batch))
            speed = (audio_seconds - resumed_seconds) / max(1e-9, time.time() - t_start)
            pbar.set_postfix(audio_s=f"{audio_seconds:.0f}", x_realtime=f"{speed:.1f}")
        save_chunk(work, n_chunks, encoded, args.whisper_mel)
        done += encoded
        n_chunks += 1
    pbar.close()
    done.sort(key=lambda clip: clip[0]["id"])         # by id: one order, resumed or not
    infos, embs, mels, wmels = [[clip[k] for clip in done] for k in range(4)]
    return infos, embs, mels, wmels, (audio_seconds, resumed_seconds)

# --- the offline codec: its codebooks, its decoder tuned to them, its report

def fit_offline_codec(codec, allemb, bounds, infos, codec_wavs, args, stage):
    """The offline codec, finished and staged as codec.pt. Its codebooks are fitted on a sample of
    the encoder's outputs (allemb; clip i is bounds[i]:bounds[i + 1]), its decoder is tuned to
    them, and on synth it is measured on held-out clips. Returns allemb standardised (see
    calibrate) and the measures for meta.json (None when not measured)."""
    t0 = time.time()
    allemb = calibrate(codec, allemb)
    pick = np.random.default_rng(0).permutation(len(allemb))[:args.kmeans_frames]
    fit_codebooks(codec, allemb[torch.from_numpy(np.sort(pick))], iters=args.kmeans_iters,
                  quiet=args.quiet)
    print(f"offline codec: fitted {N_Q} codebooks x {CODEBOOK_SIZE} on {len(pick)} frames in "
          f"{time.time() - t0:.1f}s")
    if len(pick) < 10 * CODEBOOK_SIZE:  # k-means gets too few frames per entry to place them
        more = (f"a larger --kmeans_frames (now {args.kmeans_frames}; the corpus has "
                f"{len(allemb)})" if len(allemb) > len(pick) else "more audio")
        print(f"note: {len(pick)} frames are few for {CODEBOOK_SIZE}-entry codebooks (the built-in "
              f"corpus gives 64 per entry): its codes will be coarse. Use {more}, or "
              f"--codec_from=<a prepared data dir> to reuse that data's codec", file=sys.stderr)
    row = {info["id"]: i for i, info in enumerate(infos)}
    ids = [i for i in codec_wavs if i in row]
    embs = [allemb[bounds[row[i]]:bounds[row[i] + 1]] for i in ids]
    tune_decoder(codec, [codec_wavs[i] for i in ids], embs, args.codec_tune_steps, quiet=args.quiet)
    torch.save({"model": codec_state(codec), "fitted": True, "bandwidth": BANDWIDTH, "n_q": N_Q},
               stage("codec.pt"))
    measured = None
    if args.dataset == "synth" and args.codec_report:
        # its held-out clips are of every kind: speech only where the speech library loads
        measured = report_offline_codec(codec, args.seed, stage,
                                        not args.no_speech and speech_problem() is None)
    print(f"offline codec: done in {time.time() - t0:.0f}s")
    return allemb, measured

def report_offline_codec(codec, seed, stage, speech=True):
    """The offline codec measured on held-out synth clips (see codec_report), speech among them
    unless speech=False. Printed, drawn in codec.png (input vs decode(encode(x))) and returned for
    meta.json."""
    probes = codec_probes(seed, speech=speech)
    # the report takes a while and prints only at its end: say now what it measures
    print(f"offline codec: measuring decode(encode(x)) on {sum(map(len, probes.values()))} "
          f"held-out clips ({len(probes['note'])} notes read for pitch, {len(probes['morse'])} "
          f"morse words and {len(probes['dtmf'])} DTMF numbers read back, {len(probes['any'])} "
          f"clips of every kind for the log-mel L1)")
    r, rec = codec_report(codec, probes, untrained=offline_codec())
    print(f"offline codec on held-out clips, decode(encode(x)) at {BANDWIDTH:g} kbps: notes at the "
          f"labelled pitch {r['notes']:.0%} of {len(probes['note'])}, morse words read back "
          f"{r['morse']:.0%} of {len(probes['morse'])}, DTMF digits {r['dtmf']:.0%} of "
          f"{len(probes['dtmf'])} (notes from codebook 0 alone {r['notes_codebook0']:.0%}); "
          f"log-mel L1 {r['mel_l1']:.3f} (untrained decoder "
          f"{r['mel_l1_untrained']:.3f}, {r['mel_l1_untrained'] / r['mel_l1']:.1f}x higher)")
    panels = []
    for kind, j in [("note", 0), ("morse", 0), ("dtmf", 0), ("any", 0), ("any", 1)]:
        w, info = probes[kind][j]
        panels += [(f"input: {info['caption']}", log_mel(w)),
                   ("reconstruction", log_mel(rec[kind][j]))]
    plot_mels(stage("codec.png"), panels,
              title="offline codec: log-mel of held-out input vs decode(encode(x))")
    return r

# --- pass 2: quantize (cheap), tokenize, write the splits and meta.json

def quantize_clips(codec, allemb, bounds, quiet=False):
    """Each clip's codes, (frames, N_Q) uint16. Quantizing is frame by frame, so all the clips
    go through at once, in big slices."""
    step = 16384                           # ~1 s each on one core: a bar for a large corpus
    slices = range(0, len(allemb), step)
    allcodes = [quantize(codec, allemb[s:s + step])
                for s in tqdm(slices, desc="quantize", unit="slice",
                              disable=quiet or len(slices) < 20)]
    allcodes = torch.cat(allcodes).numpy().astype(np.uint16)
    return [allcodes[bounds[i]:bounds[i + 1]] for i in range(len(bounds) - 1)]

def write_tokenizer(infos, vocab_size, stage):
    """The corpus BPE, trained on all the clips' text and staged as tokenizer.tiktoken; returns
    its record for meta.json. The text is stored as text: configs naming tokenizer="corpus" read
    it with this BPE, those naming "gpt2" with GPT-2's (loaded when the model loads the data)."""
    texts = list(PROMPT_TEXT)
    for info in infos:
        texts += [info.get(k) or "" for k in ("transcript", "caption", "description")]
        texts += [q["q"] + " " + q["a"] for q in info.get("qa", [])]
        texts += [" ".join(f"{k} {v}" for k, v in info["labels"].items())]
    t0 = time.time()
    ranks = train_bpe(texts, vocab_size)
    save_ranks(ranks, stage(CORPUS_BPE_FILE))
    tok_info = {"name": "corpus", "file": CORPUS_BPE_FILE, "vocab_size": len(ranks) + 1,
                "eot_token": len(ranks), "special_tokens": {EOT: len(ranks)},
                "note": "the corpus BPE available with this data (byte-level, trained on its "
                        "text), for configs with tokenizer='corpus'; the clips' text is stored as "
                        "text, so tokenizer='gpt2' reads it too"}
    print(f"tokenizer: corpus BPE of {len(ranks) + 1} tokens trained in {time.time() - t0:.1f}s -> "
          f"{CORPUS_BPE_FILE} (configs with tokenizer='gpt2' use GPT-2's BPE instead)")
    return tok_info

def write_splits(infos, codes, mels, wmels, args, stage):
    """The train and val splits, staged: {split}_codes.bin (unless codes is None: --no_codes),
    {split}_mel.bin, {split}_wmel.bin with --whisper_mel, and {split}_clips.jsonl, each clip's text
    and where its frames are. Returns each split's clip and frame counts."""
    in_val = [is_val(info["id"], args.val_percent) for info in infos]
    if args.val_percent > 0 and len(infos) >= 2 and not any(in_val):
        # a tiny dataset still gets a val clip (empty files cannot be mmapped)
        in_val[-1] = True
    if all(in_val):
        in_val[0] = False
    splits = {}
    for split in ("train", "val"):
        idx = [i for i in range(len(infos)) if in_val[i] == (split == "val")]
        offset, woffset, lines = 0, 0, []
        for i in idx:
            info = infos[i]
            rec = {"id": info["id"], "offset": offset, "frames": len(mels[i]),
                   "source": info["source"],
                   "kind": info["kind"], "duration": info["duration"],
                   "transcript": info.get("transcript"),
                   "caption": info.get("caption"), "description": info.get("description"),
                   "labels": info["labels"], "qa": info.get("qa", [])}
            if args.whisper_mel:
                rec["woffset"], rec["wframes"] = woffset, len(wmels[i])
                woffset += len(wmels[i])
            lines.append(json.dumps(rec))
            offset += len(mels[i])
        def write_rows(rows, width, dtype, fname):  # the split's clips' rows, end to end
            x = np.concatenate([rows[i] for i in idx]) if idx else np.zeros((0, width), dtype)
            np.ascontiguousarray(x, dtype=dtype).tofile(stage(fname))
        if codes is not None:
            write_rows(codes, N_Q, np.uint16, f"{split}_codes.bin")
        write_rows(mels, N_MELS, np.float16, f"{split}_mel.bin")
        if args.whisper_mel:
            write_rows(wmels, WHISPER_N_MELS, np.float16, f"{split}_wmel.bin")
        stage(f"{split}_clips.jsonl").write_text("".join(l + "\n" for l in lines))
        splits[split] = {"clips": len(idx), "frames": int(offset)}
    return splits

def write_meta(args, args_hash, codec_info, tok_info, splits, audio_seconds, problems, stage):
    """meta.json, staged: the data contract's numbers, the codec, the tokenizer, the splits, the
    arguments."""
    meta = {
        "sample_rate": SAMPLE_RATE, "frame_rate": FRAME_RATE, "hop_length": HOP, "n_fft": N_FFT,
        "n_mels": N_MELS,
        "mel": {"fmin": F_MIN, "fmax": F_MAX, "scale": "htk", "norm": "none (triangles of peak 1)",
                "window": "hann (periodic)",
                "center_sample": f"frame i is centred on sample {HOP}*i + {MEL_CENTER}; it sees "
                                 f"{MEL_LOOKAHEAD} samples past its block",
                "lookahead_samples": MEL_LOOKAHEAD,   # read by whisper_gpt.leak_free_lag
                "log": f"(log10(max(mel_power, {LOG_FLOOR})) + 4) / 4, power scaled so a "
                       "full-scale sine's bin is ~1 (0 dB -> 1, floor -> -1)"},
        "n_q": N_Q, "codebook_size": CODEBOOK_SIZE, "codec": codec_info, "tokenizer": tok_info,
        "splits": splits, "dataset": args.dataset, "audio_seconds": round(audio_seconds, 2),
        "skipped": dict(problems),
        # what made the data, not how the run was watched: a resumed run writes the same bytes
        "args": {k: v for k, v in vars(args).items() if k not in ("force", "quiet")},
        "args_hash": args_hash,
    }
    if args.whisper_mel:
        meta["whisper_mel"] = {"n_mels": WHISPER_N_MELS, "frame_rate": WHISPER_FRAME_RATE,
                               "sample_rate": WHISPER_SR,
                               "file": "{split}_wmel.bin (float16 [frames, 80]); clip at woffset, "
                                       "wframes",
                               "log": "as whisper.audio.log_mel_spectrogram on the clip padded "
                                      "to 30 s, but for the last frame, which sees the clip "
                                      "reflected (Whisper: the zeros)"}
    stage("meta.json").write_text(json.dumps(meta, indent=2))

def finish(out, work, args, stage):
    """An earlier run's files that will no longer match removed, the staged files renamed into
    place (meta.json last), --codebook0_mel's files made, and the work directories removed."""
    # first: a crash between the two never leaves the old codebook-0 mels beside the new codes
    # (they are remade from the codes when missing)
    for split in ("train", "val"):
        (out / f"{split}_mel_c0.bin").unlink(missing_ok=True)
        if not args.whisper_mel:
            (out / f"{split}_wmel.bin").unlink(missing_ok=True)
        if args.no_codes:
            (out / f"{split}_codes.bin").unlink(missing_ok=True)
    staged = {path.name for _, path in stage.files}
    for name in ("codec.pt", "codec.png"):  # the offline codec of an earlier run, and its picture
        if name not in staged:
            (out / name).unlink(missing_ok=True)
    stage.commit()
    if args.codebook0_mel:
        codebook0_mels(out, args.quiet)
    shutil.rmtree(work, ignore_errors=True)
    for old in out.glob(".work-*"):
        shutil.rmtree(old, ignore_errors=True)

def print_summary(out, splits, codes, problems, audio_seconds, resumed_seconds, wall):
    """What was written, what was skipped, and how fast."""
    used = ("no codes (--no_codes)" if codes is None else
            f"codes use {len(np.unique(np.concatenate(codes)[:, 0]))} of {CODEBOOK_SIZE} values "
            f"in codebook 0")
    print(f"wrote {out}: train {splits['train']['clips']} clips / {splits['train']['frames']} "
          f"frames, val {splits['val']['clips']} clips / {splits['val']['frames']} frames; {used}")
    for split in ("train", "val"):
        if not splits[split]["clips"]:
            print(f"note: the {split} split has no clips: train.py and eval.py read both splits, "
                  f"so this data serves as another's held-out clips only (--val_percent)")
    if problems:
        counts = ", ".join(f"{n} x {p}" for p, n in problems.most_common())
        print(f"skipped {sum(problems.values())} inputs: {counts}")
    done_now = audio_seconds - resumed_seconds
    print(f"done: {done_now:.1f} s of audio processed in {wall:.1f} s wall = {done_now / wall:.2f} "
          "audio-seconds per second"
          + (f" ({resumed_seconds:.1f} s more resumed from an earlier run)" if resumed_seconds
             else ""))

# -----------------------------------------------------------------------------
# main

class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, but not an unset (None) or off (False) one, nor twice."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)

def get_args(argv=None):
    p = argparse.ArgumentParser(description="Prepare aligned EnCodec codes + log-mel + text for "
                                "the audio LLMs.", formatter_class=HelpWithDefaults,
                                allow_abbrev=False)  # --clip=20 is a mistake, not --clips=20
    p.add_argument("--dataset", default="synth", choices=["synth", "librispeech", "folder"],
                   help="synth: the built-in corpus; librispeech: FLAC + .trans.txt; folder: any "
                        "audio (+ manifest)")
    p.add_argument("--src", default=None, help="input directory for librispeech / folder")
    p.add_argument("--name", default=None,
                   help="output name: data/NAME/ (default: the dataset name)")
    p.add_argument("--out_dir", default=None, help="output directory (overrides data/NAME)")
    p.add_argument("--clips", type=int, default=2000, help="synth: number of clips")
    p.add_argument("--max_seconds", type=float, default=3.0, help="synth: longest clip in seconds")
    p.add_argument("--seed", type=int, default=1337, help="synth: corpus seed")
    p.add_argument("--no_speech", action="store_true",
                   help="synth: leave out the spoken sentences (a quarter of the corpus)")
    p.add_argument("--kinds", default=None, type=lambda s: sorted(set(s.split(","))),
                   help=f"synth: only these kinds, comma-separated, of "
                        f"{','.join(k for k, _, _ in KIND_MIX)} (default: all)")
    p.add_argument("--val_percent", type=float, default=10.0,
                   help="percent of clips in the val split")
    p.add_argument("--codec_dir", default=None,
                   help=f"directory with the pretrained {CODEC_FILE} (an error if it is not there; "
                        f"without this option: the hub cache, else a download (not with "
                        f"--offline), else the offline codec)")
    p.add_argument("--offline", action="store_true",
                   help="no download of EnCodec's weights: local files or the offline codec")
    p.add_argument("--offline_codec", action="store_true",
                   help="fit the offline codec even if pretrained weights exist")
    p.add_argument("--codec_from", default=None,
                   help="the codec of another prepared data dir, copied, not fitted here: the two "
                        "corpora's codes then stand for the same sounds (a held-out test corpus "
                        "for a Whisper-GPT trained on that data)")
    p.add_argument("--codec_steps", type=int, default=0,
                   help="offline codec: steps training its learned parts after the analytic "
                        "start (batches of 4 x 0.3 s; 0: none, see docs/codec.md)")
    p.add_argument("--codec_clips", type=int, default=400,
                   help="offline codec: train-split clips that --codec_steps and "
                        "--codec_tune_steps learn from")
    p.add_argument("--codec_tune_steps", type=int, default=0,
                   help="offline codec: decoder steps on the fitted codes (0: none)")
    p.add_argument("--codec_report", type=int, default=1,
                   help="offline codec on synth: measure it on held-out clips (0: skip)")
    p.add_argument("--kmeans_frames", type=int, default=65536,
                   help="offline codec: encoder frames used to fit the codebooks")
    p.add_argument("--kmeans_iters", type=int, default=12,
                   help="offline codec: k-means iterations per codebook")
    p.add_argument("--vocab_size", type=int, default=4096,
                   help="corpus BPE: largest vocab (the bytes + merges)")
    p.add_argument("--whisper_mel", action="store_true",
                   help="also store OpenAI Whisper's input features ({split}_wmel.bin: 80 bins, 16 "
                        "kHz, 100 frames/s)")
    p.add_argument("--codebook0_mel", action="store_true",
                   help="also store {split}_mel_c0.bin, the log-mel of codebook 0 decoded alone "
                        "(Whisper-GPT's mel_source=codebook0)")
    p.add_argument("--no_codes", action="store_true",
                   help="store the mel and the text only, no EnCodec codes (no codec is loaded or "
                        "fitted, ~15x faster): a corpus for the readers of the mel, SALMONN and "
                        "Pengi; Whisper-GPT refuses it")
    p.add_argument("--batch_seconds", type=float, default=16.0,
                   help="audio seconds per EnCodec batch")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first bad input instead of skipping it")
    p.add_argument("--force", action="store_true",
                   help="rebuild the output, even if complete or prepared with other arguments")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)

def keep_freed_memory():
    """glibc returns every large freed block to the OS, so each conv's fresh buffer costs page
    faults: EnCodec then spends half its CPU time in the kernel. Keep freed memory in the heap
    instead (Linux/glibc only)."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        # M_MMAP_THRESHOLD: no mmap for blocks under 64 MiB
        libc.mallopt(-3, 64 << 20)
        # M_TRIM_THRESHOLD: keep up to 64 MiB of freed heap
        libc.mallopt(-1, 64 << 20)
    except (OSError, AttributeError):
        pass

def main(argv=None):
    args = get_args(argv)
    t_start = time.time()
    keep_freed_memory()
    # every core unless OMP_NUM_THREADS is set (jobs run side by side set it to 1)
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    check_args(args)
    out = output_dir(args)
    check_out_dir(out, args.force)
    drop_speech_if_unavailable(args)                  # changes args: before hash_args
    args_hash = hash_args(args)
    if already_prepared(out, args, args_hash):
        if args.src:
            print("(the files under --src are not compared: after changing them, use --force)")
        if args.codebook0_mel:                        # made from the stored codes: no rebuild
            try:
                codebook0_mels(out, args.quiet)
            except (ValueError, OSError) as e:        # its codec file cut short, say
                sys.exit(f"error: --codebook0_mel: {e}")
        return out
    check_whisper_mel(args)
    input_problems = InputProblems(args.strict)
    clips, n_total = clip_list(args, input_problems)  # first: an empty --src needs no codec
    if not n_total:
        sys.exit(f"error: --src={args.src}: no audio files to prepare (skipped "
                 f"{sum(input_problems.counts.values())} inputs); nothing written")
    codec, codec_info = (None, None) if args.no_codes else get_codec(args, out)
    made = make_out_dir(out)                          # made only now: there are clips to encode
    work = work_dir(out, work_hash(args), codec_info["name"] if codec else "no_codes", args.force)
    (work / "args_hash").write_text(args_hash)        # which run may resume here (already_prepared)
    codec_wavs = {}
    fit_codec = codec is not None and not codec_info["pretrained"] and not args.codec_from
    copy_codec = codec is not None and not codec_info["pretrained"] and bool(args.codec_from)
    try:
        if copy_codec:  # the very file the codes are made with, copied now: DIR may change
            shutil.copyfile(Path(args.codec_from) / codec_info["weights"], work / "codec_from.pt")
        if fit_codec:
            codec_wavs = start_offline_codec(codec, clips, input_problems, args, work)
        encoded = encode_clips(codec, clips, n_total, args, work, t_start)   # pass 1, resumable
        infos, embs, mels, wmels, (audio_seconds, resumed_seconds) = encoded
        if not infos:
            sys.exit(f"error: no usable clips (skipped {sum(input_problems.counts.values())} "
                     f"inputs); nothing written")
    except BaseException as e:  # no usable clip, a --strict stop, Ctrl-C: no empty folder left
        # nothing to resume from: the arguments' hash and the copy of --codec_from's codec alone
        nothing_kept = {p.name for p in work.iterdir()} <= {"args_hash", "codec_from.pt"}
        no_chunk = not any(work.glob("chunk*[0-9].npz"))
        if nothing_kept:
            for p in work.iterdir():
                p.unlink()
        remove_empty([work, *made])
        if no_chunk and isinstance(e, KeyboardInterrupt):  # interrupted_message would say "clips"
            sys.exit("\ninterrupted before the first chunk of clips was encoded: " +
                     ("nothing is kept" if nothing_kept else f"the offline codec's training "
                      f"steps are kept; run {resume_command(args.force)} again to resume"))
        raise
    stage = Staging(out)                              # from here on every output is staged
    allemb = torch.from_numpy(np.concatenate(embs)).float()
    bounds = np.cumsum([0] + [len(e) for e in embs])  # clip i is allemb[bounds[i]:bounds[i + 1]]
    if fit_codec:
        allemb, measured = fit_offline_codec(codec, allemb, bounds, infos, codec_wavs, args, stage)
        if measured:
            codec_info["report"] = measured
    elif copy_codec:
        shutil.copyfile(work / "codec_from.pt", stage(codec_info["weights"]))
    codes = None if codec is None else quantize_clips(codec, allemb, bounds, args.quiet)  # pass 2
    tok_info = write_tokenizer(infos, args.vocab_size, stage)
    splits = write_splits(infos, codes, mels, wmels, args, stage)
    wall = time.time() - t_start
    write_meta(args, args_hash, codec_info, tok_info, splits, audio_seconds, input_problems.counts,
               stage)
    finish(out, work, args, stage)
    print_summary(out, splits, codes, input_problems.counts, audio_seconds, resumed_seconds, wall)
    return out

def resume_command(force):
    """The command that resumes a stopped run: not with --force, which starts anew."""
    return "the same command" + (" without --force" if force else "")

def interrupted_message(argv):
    """What Ctrl-C says once clips are encoded: the chunks under .work-* are kept (see main's
    except), and how to resume them."""
    return (f"\ninterrupted: the clips encoded so far are kept; run "
            f"{resume_command(get_args(argv).force)} again to resume (other arguments start anew)")

if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # a line, not a traceback
        sys.exit(interrupted_message(sys.argv[1:]))
