"""
The tokenizers of the prepared text. The data is stored as text, and each model's config names the
tokenizer it reads that text with:
  "corpus": a small byte-level BPE that prepare.py trains on the corpus text (train_bpe) and
            stores with the data. CPU-sized LLMs want it: GPT-2's 50k-row LM head would be ~8x
            the rest of a 4 x 128 model.
  "gpt2":   GPT-2's BPE, for GPT-2-compatible LLMs, from tiktoken (its cache or a download) or,
            offline, from the copy of its ranks that openai-whisper ships.
train.py, sample.py and eval.py load them from here. audio.py also finds Whisper's mel filters in
openai-whisper's assets with whisper_assets_dir.
"""

import base64
import hashlib
import os
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

EOT = "<|endoftext|>"
# GPT-2's pre-tokenisation pattern (its release's contractions 's|'t|'re|'ve|'m|'ll|'d grouped as
# tiktoken writes them; tiktoken's "gpt2" is an equivalent, faster form)
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

TOKENIZERS = ("corpus", "gpt2")
CORPUS_BPE_FILE = "tokenizer.tiktoken"
# Prompt-style text (templates and instructions like those the models put around the data, not an
# exact list of them) trained into the corpus BPE so prompts tokenize compactly. Editing it changes
# the BPE of data prepared afterwards, and so every figure measured on it.
PROMPT_TEXT = [
    "USER: <Speech><SpeechHere></Speech> {}\nASSISTANT: {}</s>",
    "USER: <Speech><SpeechHere></Speech> Recognize the speech and give me the "
    "transcription.\nASSISTANT:",
    "USER: <Speech><SpeechHere></Speech> Transcribe the audio.\nASSISTANT:",
    "USER: <Speech><SpeechHere></Speech> Write down what you hear.\nASSISTANT:",
    "USER: <Speech><SpeechHere></Speech> Please describe the audio.\nASSISTANT:",
    "USER: <Speech><SpeechHere></Speech> Describe the audio in detail and tell a story about "
    "it.\nASSISTANT:",
    "USER: <Speech><SpeechHere></Speech> Write a caption for the audio.\nASSISTANT:",
    "USER: <Speech><SpeechHere></Speech> What sound is this?\nASSISTANT:",
    "USER: <Speech><SpeechHere></Speech> What instrument is playing?\nASSISTANT:",
    "USER: <Speech><SpeechHere></Speech> Answer the question about the audio:\nASSISTANT:",
    "generate audio caption", "generate metadata", "this is a sound of", "this acoustic scene is",
    "this emotion is", "question: ", "this music genre is", "this instrument is", "this pitch is",
    "the instrument playing is", "transcribe", "transcription", "caption", "description", "answer",
    "question",
]
# GPT-2's two files as tiktoken downloads and caches them (tiktoken_ext/openai_public.py), with
# their sha256
GPT2_FILES = {"https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe":
              "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
              "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json":
              "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"}
# sha256 of GPT-2's ranks in tiktoken's own format: openai-whisper's whisper/assets/gpt2.tiktoken
# (byte for byte tiktoken's r50k_base.tiktoken)
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_EOT = 50256

def tiktoken_cache_dir():
    """Where tiktoken caches its downloads (its own rule; "" turns caching off)."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return os.environ["TIKTOKEN_CACHE_DIR"]
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return os.environ["DATA_GYM_CACHE_DIR"]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")

def gpt2_files_cached():
    """True when both of GPT-2's files are in tiktoken's cache and intact, so that
    tiktoken.get_encoding("gpt2") reads them without the network. Checked here without the network;
    a corrupt file gets one line naming it."""
    cache, ok = tiktoken_cache_dir(), True
    for url, sha256 in GPT2_FILES.items():
        path = os.path.join(cache, hashlib.sha1(url.encode()).hexdigest()) if cache else ""
        if not path or not os.path.exists(path):
            ok = False
        elif hashlib.sha256(Path(path).read_bytes()).hexdigest() != sha256:
            print(f"tokenizer: {path} (tiktoken's cached {url.rsplit('/', 1)[1]}) is corrupt "
                  f"(sha256 mismatch): skipped")
            ok = False
    return ok

def whisper_assets_dir():
    """openai-whisper's assets folder (whisper/assets), or None when the package is not installed.
    Found without importing whisper (which imports torch and numba): pip install --no-deps
    openai-whisper is enough."""
    import importlib.util
    spec = importlib.util.find_spec("whisper")
    # not installed, or an unrelated module "whisper"
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "assets"

def whisper_gpt2_file():
    """The GPT-2 ranks file the openai-whisper package ships, or None."""
    assets = whisper_assets_dir()
    path = assets / "gpt2.tiktoken" if assets else None
    return path if path and path.is_file() else None

def load_gpt2(offline=False):
    """GPT-2's BPE as a tiktoken.Encoding (50257 tokens, <|endoftext|> = 50256) from the first
    source that has it: tiktoken's cache, tiktoken's download (skipped when offline), the ranks file
    openai-whisper ships. Says in one line which source it used, and in one line why an earlier
    source failed."""
    import tiktoken
    if gpt2_files_cached():
        tok = tiktoken.get_encoding("gpt2")
        print("tokenizer: GPT-2's BPE (tiktoken's cache)")
        return tok
    if not offline:
        try:
            tok = tiktoken.get_encoding("gpt2")
            print(f"tokenizer: GPT-2's BPE (downloaded by tiktoken into "
                  f"{tiktoken_cache_dir() or 'memory'})")
            return tok
        except Exception as e:  # e.g. no network (fails within a second or two)
            first = str(e).splitlines()[0][:120] if str(e) else ""
            why = "no name resolution" if "resolve" in str(e) else first
            print(f"tokenizer: tiktoken could not download GPT-2's BPE ({type(e).__name__}"
                  f"{': ' + why if why else ''}); trying openai-whisper's copy")
    path = whisper_gpt2_file()
    if path is None:
        problem = ("openai-whisper, which ships a copy, is not installed "
                   "(pip install --no-deps openai-whisper)")
    elif hashlib.sha256(path.read_bytes()).hexdigest() != GPT2_RANKS_SHA256:
        problem = f"openai-whisper's copy {path} is corrupt (sha256 mismatch)"
        print(f"tokenizer: {problem}: skipped")
    else:
        tok = tiktoken.Encoding(name="gpt2", pat_str=GPT2_PAT, mergeable_ranks=load_ranks(path),
                                special_tokens={EOT: GPT2_EOT}, explicit_n_vocab=GPT2_EOT + 1)
        print(f"tokenizer: GPT-2's BPE (offline: openai-whisper's copy, {path})")
        return tok
    raise RuntimeError(f"GPT-2's BPE: not in tiktoken's cache "
                       f"({tiktoken_cache_dir() or 'caching off'}), "
                       f"{'no download (offline)' if offline else 'the download failed'}, and "
                       f"{problem}")

def train_bpe(texts, vocab_size, min_count=2):
    """Byte-level BPE (GPT-2 style: merges never cross the regex pre-token boundaries). It merges
    the most frequent pair until there are vocab_size ranks or no pair occurs min_count times.
    Returns mergeable ranks {bytes: rank}: the 256 bytes first, then the merges in the order
    learned. Pair counts are kept up to date: a merge rescans only the words indexed under its
    pair."""
    import regex
    pat = regex.compile(GPT2_PAT)
    words = Counter()
    for t in texts:
        words.update(pat.findall(t))
    seqs = [[bytes([b]) for b in w.encode("utf-8")] for w in words]
    freqs = [words[w] for w in words]
    pairs = Counter()
    # pair -> indices of the words that hold it, or once did: a merge adds entries but removes
    # none, and rescanning a word that lost the pair leaves it unchanged
    where = defaultdict(set)
    for i, s in enumerate(seqs):
        for a, b in zip(s, s[1:]):
            pairs[(a, b)] += freqs[i]
            where[(a, b)].add(i)
    ranks = {bytes([b]): b for b in range(256)}
    while len(ranks) < vocab_size and pairs:
        (a, b), c = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))  # ties: the larger pair
        if c < min_count:
            break
        new = a + b
        if new not in ranks:
            ranks[new] = len(ranks)
        for i in list(where[(a, b)]):
            s, f = seqs[i], freqs[i]
            for p in zip(s, s[1:]):                   # remove this word's old pairs
                pairs[p] -= f
                if pairs[p] <= 0:
                    del pairs[p]
            j, out = 0, []
            while j < len(s):
                if j + 1 < len(s) and s[j] == a and s[j + 1] == b:
                    out.append(new)
                    j += 2
                else:
                    out.append(s[j])
                    j += 1
            seqs[i] = out
            for p in zip(out, out[1:]):               # add the new ones
                pairs[p] += f
                where[p].add(i)
        pairs.pop((a, b), None)
        where.pop((a, b), None)
    return ranks

def ranks_text(ranks):
    """Mergeable ranks in tiktoken's file format: one "base64(token) rank" line per token."""
    return "".join(f"{base64.b64encode(tok).decode()} {r}\n"
                   for tok, r in sorted(ranks.items(), key=lambda kv: kv[1]))

def parse_ranks(text, where):
    """The inverse of ranks_text; where names the source in the error for a corrupt one."""
    ranks = {}
    try:
        for line in text.splitlines():
            if line:
                tok, r = line.split()
                ranks[base64.b64decode(tok, validate=True)] = int(r)
    except ValueError:  # (binascii.Error is a ValueError)
        raise ValueError(f"{where}: corrupt BPE ranks (line {line[:40]!r} is not "
                         f"'base64 rank')") from None
    if (sorted(ranks.values()) != list(range(len(ranks))) or len(ranks) < 256
            or any(bytes([b]) not in ranks for b in range(256))):
        raise ValueError(f"{where}: corrupt BPE ranks (expected ranks 0..n-1 over at least the 256 "
                         f"bytes)")
    return ranks

def save_ranks(ranks, path):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(ranks_text(ranks))
    os.replace(tmp, path)

def load_ranks(path):
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: corrupt BPE ranks (not text)") from None
    return parse_ranks(text, path)

def make_encoding(name, ranks):
    import tiktoken
    return tiktoken.Encoding(name=name, pat_str=GPT2_PAT, mergeable_ranks=ranks,
                             special_tokens={EOT: len(ranks)})

def load_tokenizer(data_dir, name="corpus", offline=False):
    """The tiktoken.Encoding a model's config names. "corpus": the BPE prepare.py trained on
    data_dir's text and stored there. "gpt2": GPT-2's (load_gpt2; offline skips its download).
    Either one reads the same stored text."""
    if name == "gpt2":
        return load_gpt2(offline)
    if name != "corpus":
        raise ValueError(f"tokenizer={name!r}: unknown tokenizer; expected one of "
                         f"{', '.join(TOKENIZERS)}")
    path = Path(data_dir) / CORPUS_BPE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the corpus BPE is missing (prepare.py writes it with the "
                                f"data)")
    return make_encoding("corpus", load_ranks(path))

def tokenizer_record(tok):
    """What a checkpoint keeps of its tokenizer: the name and, for a corpus BPE, its ranks, so that
    the checkpoint decodes without the data dir it was trained on (GPT-2's BPE is known by its
    name)."""
    rec = {"name": tok.name, "vocab_size": tok.n_vocab, "eot_token": tok.eot_token}
    if tok.name != "gpt2":  # a corpus BPE: ranks 0..eot-1, eot last
        rec["ranks"] = ranks_text({tok.decode_single_token_bytes(i): i
                                   for i in range(tok.eot_token)})
    return rec

def tokenizer_from_record(rec, where="checkpoint"):
    """The tiktoken.Encoding of a tokenizer_record (where: names its source in errors)."""
    if rec.get("name") == "gpt2":
        return load_gpt2()
    if not isinstance(rec.get("ranks"), str):
        raise ValueError(f"{where}: tokenizer record {rec.get('name')!r} has no ranks")
    return make_encoding(rec["name"], parse_ranks(rec["ranks"], f"{where} (its tokenizer)"))

def checkpoint_tokenizer(checkpoint, config, data_dir, where="checkpoint"):
    """The tokenizer a checkpoint's model was trained with: the one it records (a corpus BPE travels
    with its ranks); an older checkpoint gets the one its config names, from data_dir. None for
    models without text."""
    if checkpoint.get("tokenizer"):
        return tokenizer_from_record(checkpoint["tokenizer"], where)
    name = getattr(config, "tokenizer", None)
    return load_tokenizer(data_dir, name) if name else None
