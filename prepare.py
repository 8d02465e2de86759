"""
Prepare audio + text data for the three models: 24 kHz audio -> EnCodec codes and an aligned log-mel
spectrogram (one mel frame per codec frame), plus captions / transcripts / labels / QA as text and tokens.

    python prepare.py                                   # built-in offline corpus -> data/synth/
    python prepare.py --clips=3000                      # a bigger one
    python prepare.py --dataset=librispeech --src=LibriSpeech/dev-clean --name=libri
    python prepare.py --dataset=folder --src=my_wavs --name=mine     # optional manifest.csv / manifest.jsonl

Output in data/<name>/ (see README): meta.json, {split}_codes.bin (uint16 [frames, n_q]),
{split}_mel.bin (float16 [frames, n_mels]), {split}_clips.jsonl, plus the tokenizer file and, for the
offline codec, codec.pt. Read with np.memmap(path, dtype, mode="r").reshape(-1, n_q or n_mels).

Other scripts use: load_tokenizer(data_dir), load_codec(data_dir), load_audio(path), resample(wav, sr_in, sr_out),
log_mel(wav), features(wav, codec).
"""
import os
import sys
import io
import re
import csv
import json
import math
import time
import types
import base64
import shutil
import hashlib
import argparse
import warnings
import subprocess
from pathlib import Path
from collections import Counter, defaultdict

import numpy as np
import torch
import soundfile as sf
from tqdm import tqdm

# encodec imports torchaudio at module level but only uses it for file helpers we never call; the registry's
# torchaudio wheels do not load against the CPU torch, so stand in an empty module when the import fails.
try:
    import torchaudio  # noqa: F401
except Exception:
    sys.modules["torchaudio"] = types.ModuleType("torchaudio")
from encodec import EncodecModel  # noqa: E402

# -----------------------------------------------------------------------------
# the data contract's fixed numbers

SAMPLE_RATE = 24000
HOP = 320               # EnCodec 24 kHz stride: 75 frames/s
FRAME_RATE = SAMPLE_RATE // HOP
N_Q = 8                 # codebooks at 6 kbps
BANDWIDTH = 6.0
CODEBOOK_SIZE = 1024
N_MELS = 64
N_FFT = 640             # 26.7 ms Hann window (37.5 Hz bins: the lowest mel filters still cover whole bins)
F_MIN, F_MAX = 0.0, SAMPLE_RATE / 2
# EnCodec is causal: codec frame i is computed from samples < 320*(i+1), and its own 13.3 ms are
# samples [320*i, 320*(i+1)). Mel frame i is centred on the middle of that block, sample 320*i + 160,
# so its window spans [320*i + 160 - N_FFT/2, 320*i + 160 + N_FFT/2) (zero padded at the edges).
MEL_CENTER = HOP // 2
MEL_LOOKAHEAD = N_FFT // 2 - MEL_CENTER   # samples of the next block a mel frame sees (160 = half a frame)
LOG_FLOOR = 1e-8        # -80 dB
AUDIO_EXTS = {".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif", ".au"}
CODEC_FILE = "encodec_24khz-d7cc33bc.th"
EOT = "<|endoftext|>"
# GPT-2's pre-tokenisation pattern (the same string tiktoken uses for "gpt2")
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

def n_frames(n_samples):
    """Frames EnCodec gives for n samples (and so the mel too)."""
    return -(-n_samples // HOP)

# -----------------------------------------------------------------------------
# audio I/O and resampling (our own: torchaudio is not usable with the CPU torch)

_kernels = {}

def _resample_kernels(up, down, zeros=24, beta=8.0):
    """Polyphase windowed-sinc filters: one row per output phase p = (n * down) % up."""
    key = (up, down)
    if key not in _kernels:
        cutoff = 0.97 * min(1.0, up / down)          # of the input Nyquist; a little margin for the transition band
        half = int(math.ceil(zeros / cutoff))        # taps each side, in input samples
        taps = np.arange(-half, half + 2)            # input offsets relative to floor(t)
        phase = np.arange(up)[:, None] / up           # fractional position of the output between input samples
        x = taps[None, :] - phase                    # distance in input samples
        w = np.kaiser(2 * half + 3, beta)            # a smooth window over |x| <= half + 1
        w = np.interp(x, np.linspace(-half - 1, half + 1, 2 * half + 3), w)
        k = cutoff * np.sinc(cutoff * x) * w
        k /= k.sum(axis=1, keepdims=True)            # unit DC gain per phase
        _kernels[key] = (taps, k.astype(np.float32))
    return _kernels[key]

def resample(wav, sr_in, sr_out=SAMPLE_RATE):
    """Band-limited resampling of a 1-D float array by a rational factor (polyphase windowed sinc, Kaiser window).
    Output length is ceil(len * sr_out / sr_in); output sample n sits at input time n * sr_in / sr_out."""
    wav = np.asarray(wav, dtype=np.float32)
    sr_in, sr_out = int(sr_in), int(sr_out)
    if sr_in == sr_out:
        return wav.copy()
    g = math.gcd(sr_in, sr_out)
    up, down = sr_out // g, sr_in // g
    taps, k = _resample_kernels(up, down)
    n_out = -(-len(wav) * up // down)
    pad = taps.max() + 1
    x = np.concatenate([np.zeros(pad, np.float32), wav, np.zeros(pad + 1, np.float32)])
    out = np.empty(n_out, np.float32)
    for s in range(0, n_out, 16384):                 # in chunks: the gather is (chunk, taps)
        n = np.arange(s, min(n_out, s + 16384))
        base = (n * down) // up
        ph = (n * down) % up
        out[s:s + len(n)] = np.einsum("nt,nt->n", x[base[:, None] + taps[None, :] + pad], k[ph])
    return out

class BadAudio(ValueError):
    pass

def check_audio(wav, name="audio"):
    """Raise BadAudio with a clear reason if a 24 kHz clip cannot be used."""
    if wav.size == 0:
        raise BadAudio(f"{name}: zero-length audio (0 samples)")
    if not np.all(np.isfinite(wav)):
        raise BadAudio(f"{name}: contains NaN or infinite samples")
    if wav.size < HOP:
        raise BadAudio(f"{name}: shorter than one frame ({wav.size} samples < {HOP} at {SAMPLE_RATE} Hz)")
    if np.abs(wav).max() < 1e-4:
        raise BadAudio(f"{name}: all silent (peak {np.abs(wav).max():.1e})")

def load_audio(path, sr=SAMPLE_RATE):
    """Read any file libsndfile reads (wav, flac, ogg, ...), downmix to mono, resample to sr.
    Returns float32 np array. Raises BadAudio (a ValueError) naming the file and the problem."""
    path = str(path)
    try:
        data, file_sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:
        raise BadAudio(f"{path}: unreadable or corrupt audio ({type(e).__name__}: {str(e).strip()[:120]})")
    wav = data.mean(axis=1)
    if wav.size and np.all(np.isfinite(wav)):
        wav = resample(wav, file_sr, sr)
    check_audio(wav, path)
    return wav

# -----------------------------------------------------------------------------
# log-mel spectrogram, framed exactly like the codec (see MEL_CENTER above)

def mel_filterbank(n_mels=N_MELS, n_fft=N_FFT, sr=SAMPLE_RATE, fmin=F_MIN, fmax=F_MAX):
    """Triangular filters on the HTK mel scale with peak 1 (no area norm, so a pure tone reads about the same at
    any frequency), (n_mels, n_fft//2 + 1)."""
    hz2mel = lambda f: 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)
    mel2hz = lambda m: 700.0 * (10.0 ** (np.asarray(m) / 2595.0) - 1.0)
    edges = mel2hz(np.linspace(hz2mel(fmin), hz2mel(fmax), n_mels + 2))
    freqs = np.arange(n_fft // 2 + 1) * sr / n_fft
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    fb = np.maximum(0.0, np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)))
    return fb.astype(np.float32)

_mel_cache = {}

def log_mel(wav):
    """Log-mel spectrogram: (n,) or (B, n) audio at 24 kHz -> (frames, 64) or (B, frames, 64), frames = ceil(n/320).
    Accepts numpy or torch; returns the same kind (float32). Values: (log10(mel power) + 4) / 4, power of a
    Hann-windowed frame scaled so a full-scale sine is ~0 dB (-> ~1); silence sits at -1 (floor -80 dB)."""
    is_np = not torch.is_tensor(wav)
    x = torch.as_tensor(np.asarray(wav, dtype=np.float32)) if is_np else wav.float()
    squeeze = x.dim() == 1
    if squeeze:
        x = x[None]
    if "fb" not in _mel_cache:
        _mel_cache["fb"] = torch.from_numpy(mel_filterbank())
        _mel_cache["win"] = torch.hann_window(N_FFT, periodic=True)
    fb, win = _mel_cache["fb"].to(x.device), _mel_cache["win"].to(x.device)
    n = x.shape[-1]
    T = n_frames(n)
    left = N_FFT // 2 - MEL_CENTER                   # frame 0 starts at sample 160 - N_FFT/2
    right = (T - 1) * HOP + N_FFT - left - n
    x = torch.nn.functional.pad(x, (left, max(0, right)))
    frames = x.unfold(-1, N_FFT, HOP)[:, :T]          # (B, T, N_FFT)
    spec = torch.fft.rfft(frames * win, dim=-1)
    power = spec.real ** 2 + spec.imag ** 2
    power = power * (4.0 / win.sum() ** 2)           # amplitude-1 sine -> peak bin power ~1
    mel = power @ fb.T                                # (B, T, n_mels)
    out = (torch.log10(mel.clamp_min(LOG_FLOOR)) + 4.0) / 4.0
    if squeeze:
        out = out[0]
    return out.numpy() if is_np else out

# -----------------------------------------------------------------------------
# the codec: pretrained EnCodec 24 kHz when its weights are here, else an offline one fitted on the corpus

def find_codec_weights(codec_dir=None):
    """Directory holding encodec_24khz-d7cc33bc.th: --codec_dir, else the torch hub cache, else None."""
    cands = [Path(codec_dir)] if codec_dir else []
    cands.append(Path(torch.hub.get_dir()) / "checkpoints")
    for d in cands:
        if (d / CODEC_FILE).is_file():
            return d
    if codec_dir:
        raise FileNotFoundError(f"--codec_dir={codec_dir}: no {CODEC_FILE} there")
    return None

def pretrained_codec(weights_dir):
    warnings.filterwarnings("ignore", message=".*weight_norm.*deprecated")
    model = EncodecModel.encodec_model_24khz(pretrained=True, repository=Path(weights_dir))
    model.set_target_bandwidth(BANDWIDTH)
    return model.eval()

def offline_codec(seed=1234):
    """EnCodec's architecture with its own (seeded) random weights and unfitted codebooks (all zeros)."""
    torch.manual_seed(seed)
    warnings.filterwarnings("ignore", message=".*weight_norm.*deprecated")
    model = EncodecModel.encodec_model_24khz(pretrained=False)
    model.set_target_bandwidth(BANDWIDTH)
    return model.eval()

def kmeans(x, k, iters, gen):
    """Lloyd's k-means on the distinct rows of x (N, D), weighted by how often each occurs. Identical frames
    (digital silence, steady tones) would otherwise seed identical centroids, and exact ties make codes flip on
    rounding noise. Seeded init; an empty cluster restarts at the point worst served by its centroid.
    Returns (means (k, D), counts (k,)); with fewer distinct points than k, the spare centroids sit far away."""
    pts, inv = torch.unique(x, dim=0, return_inverse=True)
    w = torch.bincount(inv, minlength=len(pts)).float()
    n = len(pts)
    if n <= k:
        far = pts.abs().max() * 1e3 + 1e3          # spare codes no frame will ever choose
        means = torch.cat([pts, far + torch.arange(k - n, dtype=x.dtype)[:, None].expand(-1, x.shape[1])])
        return means, torch.cat([w, torch.zeros(k - n)])
    means = pts[torch.randperm(n, generator=gen)[:k]].clone()
    for _ in range(iters):
        assign, dist = assign_nearest(pts, means, return_dist=True)
        counts = torch.zeros(k).index_add_(0, assign, w)
        sums = torch.zeros_like(means).index_add_(0, assign, pts * w[:, None])
        means = sums / counts.clamp_min(1e-9)[:, None]
        empty = (counts == 0).nonzero().flatten()
        if len(empty):                               # restart empty clusters at the worst-served points
            means[empty] = pts[torch.topk(dist * w, len(empty)).indices]
    assign = assign_nearest(pts, means)
    return means, torch.zeros(k).index_add_(0, assign, w)

def assign_nearest(x, means, chunk=8192, return_dist=False):
    idx, dst = [], []
    m2 = (means ** 2).sum(1)
    for s in range(0, len(x), chunk):
        d = m2[None] - 2 * x[s:s + chunk] @ means.T
        v, i = d.min(1)
        idx.append(i)
        dst.append(v + (x[s:s + chunk] ** 2).sum(1))
    return (torch.cat(idx), torch.cat(dst)) if return_dist else torch.cat(idx)

class Standardize(torch.nn.Module):
    """Per-channel (x - mean) / std on the encoder output (B, 128, T): the offline codec's calibration."""
    def __init__(self, dim=128):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def forward(self, x):
        return (x - self.mean[:, None]) / self.std[:, None]

@torch.no_grad()
def calibrate(model, emb):
    """Offline codec only: a random encoder's outputs sit in a tiny cloud far from zero (spread ~1e-2 around a
    common offset), where float rounding alone flips nearest-codeword choices. Append a per-channel
    standardisation to the encoder, and fold its inverse into the decoder's first conv (a constant offset survives
    the reflect padding, so that is exact). emb (N, 128): outputs of the uncalibrated encoder; returns them
    standardised by the very same op, so stored codes equal what the calibrated encoder gives."""
    std = Standardize(emb.shape[1])
    std.mean.copy_(emb.mean(0))
    std.std.copy_(emb.std(0).clamp_min(1e-8))
    model.encoder.model.append(std)
    dec = model.decoder.model[0].conv.conv
    w = torch._weight_norm(dec.weight_v, dec.weight_g, 0)
    dec.bias.data.add_((w * std.mean[None, :, None]).sum((1, 2)))
    w = w * std.std[None, :, None]
    dec.weight_v.data.copy_(w)
    dec.weight_g.data.copy_(w.norm(dim=(1, 2), keepdim=True))
    return std(emb.T[None])[0].T

def fit_codebooks(model, emb, iters=12, seed=0):
    """Fit the first N_Q residual codebooks by k-means on encoder outputs emb (N, 128), as EnCodec's quantizer
    does at its first training step (there with kmeans_init), layer after layer on the residual."""
    gen = torch.Generator().manual_seed(seed)
    residual = emb.float().clone()
    for i, layer in enumerate(model.quantizer.vq.layers[:N_Q]):
        cb = layer._codebook
        means, counts = kmeans(residual, cb.codebook_size, iters, gen)
        cb.embed.data.copy_(means)
        cb.embed_avg.data.copy_(means)
        cb.cluster_size.data.copy_(counts)
        cb.inited.data.fill_(1.0)
        residual = residual - means[assign_nearest(residual, means)]
    return model

def codec_state(model):
    """State dict without the unused codebooks (layers >= N_Q stay all-zero and unfitted) and without embed_avg."""
    drop = tuple(f"quantizer.vq.layers.{i}." for i in range(N_Q, len(model.quantizer.vq.layers)))
    return {k: v for k, v in model.state_dict().items() if not k.startswith(drop) and not k.endswith("embed_avg")}

def load_codec(data_dir):
    """The EnCodec model the data in data_dir was made with (pretrained, or the offline fitted one saved there)."""
    meta = json.loads((Path(data_dir) / "meta.json").read_text())
    c = meta["codec"]
    if c["pretrained"]:
        return pretrained_codec(Path(c["weights"]).parent)
    ckpt = torch.load(Path(data_dir) / c["weights"], map_location="cpu", weights_only=True)
    if not ckpt.get("fitted"):
        raise ValueError(f"{Path(data_dir) / c['weights']}: the offline codec's codebooks were never fitted")
    model = offline_codec()
    model.encoder.model.append(Standardize())
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    if unexpected or any(not (k.endswith("embed_avg") or k.startswith("quantizer.vq.layers.")) for k in missing):
        raise ValueError(f"{Path(data_dir) / c['weights']}: does not match this prepare.py's offline codec "
                         f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}): re-run prepare.py --force")
    return model.eval()

@torch.no_grad()
def encode_emb(model, wavs):
    """Batch of 1-D float arrays -> list of encoder outputs (frames, 128), frames = ceil(n / 320). EnCodec is
    causal, so the zeros after a shorter clip do not change its frames."""
    lens = [len(w) for w in wavs]
    # every clip is zero padded to whole frames: then no conv pads its end by reflection, and a clip's codes are
    # the same alone or in a batch
    x = torch.zeros(len(wavs), 1, n_frames(max(lens)) * HOP)
    for i, w in enumerate(wavs):
        x[i, 0, :len(w)] = torch.as_tensor(w)
    emb = model.encoder(x).transpose(1, 2)            # (B, T, 128)
    return [emb[i, :n_frames(n)] for i, n in enumerate(lens)]

@torch.no_grad()
def quantize(model, emb):
    """Encoder outputs (T, 128) -> codes (T, N_Q) int64."""
    codes = model.quantizer.encode(emb.T[None], model.frame_rate, BANDWIDTH)   # (n_q, 1, T)
    return codes[:, 0].T.long()

def features(wav, codec):
    """features(wav, codec) -> (codes, mel): wav a 1-D float array/tensor at 24 kHz (n samples), codec from
    load_codec() (or a prepared data dir, whose codec is then loaded). codes: int64 np array (frames, 8) of EnCodec codes at 6 kbps (column 0 the coarse stream);
    mel: float32 np array (frames, 64) from log_mel(); frames = ceil(n / 320) for both, frame i aligned."""
    if isinstance(codec, (str, Path)):
        codec = load_codec(codec)
    wav = np.asarray(wav.detach().cpu() if torch.is_tensor(wav) else wav, dtype=np.float32)
    emb = encode_emb(codec, [wav])[0]
    return quantize(codec, emb).numpy(), log_mel(wav)

# -----------------------------------------------------------------------------
# tokenizer: GPT-2's BPE when its files are cached locally, else a small byte-level BPE trained on the corpus text

def gpt2_files_cached():
    """tiktoken would download the GPT-2 files unless both are in its cache; check without touching the network."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
        os.path.join(__import__("tempfile").gettempdir(), "data-gym-cache")
    urls = ["https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
            "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"]
    return all(os.path.exists(os.path.join(cache, hashlib.sha1(u.encode()).hexdigest())) for u in urls)

def train_bpe(texts, vocab_size, min_count=2):
    """Byte-level BPE (GPT-2 style: merges never cross the regex pre-token boundaries). Returns mergeable ranks
    {bytes: rank}: the 256 bytes first, then the merges in the order learned. Incremental pair counts."""
    import regex
    pat = regex.compile(GPT2_PAT)
    words = Counter()
    for t in texts:
        words.update(pat.findall(t))
    seqs = [[bytes([b]) for b in w.encode("utf-8")] for w in words]
    freqs = [words[w] for w in words]
    pairs = Counter()
    where = defaultdict(set)                          # pair -> indices of words containing it
    for i, s in enumerate(seqs):
        for a, b in zip(s, s[1:]):
            pairs[(a, b)] += freqs[i]
            where[(a, b)].add(i)
    ranks = {bytes([b]): b for b in range(256)}
    while len(ranks) < vocab_size and pairs:
        (a, b), c = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))   # ties broken deterministically
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

def save_ranks(ranks, path):
    lines = [f"{base64.b64encode(tok).decode()} {r}" for tok, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    atomic_write_text(path, "\n".join(lines) + "\n")

def load_ranks(path):
    ranks = {}
    for line in Path(path).read_text().splitlines():
        if line:
            tok, r = line.split()
            ranks[base64.b64decode(tok)] = int(r)
    return ranks

def make_encoding(name, ranks):
    import tiktoken
    return tiktoken.Encoding(name=name, pat_str=GPT2_PAT, mergeable_ranks=ranks, special_tokens={EOT: len(ranks)})

def load_tokenizer(data_dir):
    """The tiktoken.Encoding the data in data_dir was tokenised with (GPT-2's, or the offline BPE stored there)."""
    import tiktoken
    t = json.loads((Path(data_dir) / "meta.json").read_text())["tokenizer"]
    if t["name"] == "gpt2":
        return tiktoken.get_encoding("gpt2")
    return make_encoding(t["name"], load_ranks(Path(data_dir) / t["file"]))

# Template and instruction text the models put around the data: trained into the offline BPE so prompts
# tokenize compactly.
PROMPT_TEXT = [
    "USER: <Speech><SpeechHere></Speech> {}\nASSISTANT: {}</s>",
    "USER: <Speech><SpeechHere></Speech> Recognize the speech and give me the transcription.\nASSISTANT:",
    "USER: <Speech><SpeechHere></Speech> Transcribe the audio.\nASSISTANT:",
    "USER: <Speech><SpeechHere></Speech> Write down what you hear.\nASSISTANT:",
    "USER: <Speech><SpeechHere></Speech> Please describe the audio.\nASSISTANT:",
    "USER: <Speech><SpeechHere></Speech> Describe the audio in detail and tell a story about it.\nASSISTANT:",
    "USER: <Speech><SpeechHere></Speech> Write a caption for the audio.\nASSISTANT:",
    "USER: <Speech><SpeechHere></Speech> What sound is this?\nASSISTANT:",
    "USER: <Speech><SpeechHere></Speech> What instrument is playing?\nASSISTANT:",
    "USER: <Speech><SpeechHere></Speech> Answer the question about the audio:\nASSISTANT:",
    "generate audio caption", "generate metadata", "this is a sound of", "this acoustic scene is",
    "this emotion is", "question: ", "this music genre is", "this instrument is", "this pitch is",
    "the instrument playing is", "transcribe", "transcription", "caption", "description", "answer", "question",
]

# -----------------------------------------------------------------------------
# the built-in corpus: pure numpy signals whose text is determined by the audio

NOTE_NAMES = ["C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
INSTRUMENTS = ["sine", "square", "sawtooth", "plucked string", "bell"]
INSTRUMENT_TEXT = {  # caption noun, adjectives for the story
    "sine": ("a sine tone", "pure, soft and smooth"),
    "square": ("a square wave", "hollow, buzzy and electronic"),
    "sawtooth": ("a sawtooth synth", "bright, brassy and harsh"),
    "plucked string": ("a plucked string", "twangy, like a guitar or a harp, each note fading quickly"),
    "bell": ("a bell", "metallic and ringing, with a long shimmering decay"),
}
CHORDS = {"major": [0, 4, 7], "minor": [0, 3, 7], "diminished": [0, 3, 6], "augmented": [0, 4, 8]}
INTERVALS = {3: "minor third", 4: "major third", 5: "perfect fourth", 7: "perfect fifth", 12: "octave"}
EVENTS = ["beep", "chirp", "noise burst", "click", "siren"]
EVENT_PLURAL = {"beep": "beeps", "chirp": "chirps", "noise burst": "noise bursts", "click": "clicks", "siren": "sirens"}
EVENT_TEXT = {
    "beep": "a short electronic beep",
    "chirp": "a rising chirp that sweeps up in pitch",
    "noise burst": "a burst of hissing noise",
    "click": "a sharp click",
    "siren": "a wailing siren",
}
MORSE = {"a": ".-", "b": "-...", "c": "-.-.", "d": "-..", "e": ".", "f": "..-.", "g": "--.", "h": "....", "i": "..",
         "j": ".---", "k": "-.-", "l": ".-..", "m": "--", "n": "-.", "o": "---", "p": ".--.", "q": "--.-", "r": ".-.",
         "s": "...", "t": "-", "u": "..-", "v": "...-", "w": ".--", "x": "-..-", "y": "-.--", "z": "--.."}
WORDS = ("sos ok hi yes no go on in up at it is to we me be do so cat dog sun red sea sky run one two ten top "
         "hat map car bus fox owl cow pig egg ice tea jam box key toy bed cup pen ink art arm leg eye ear "
         "cake fish bird tree rain snow wind fire star moon ship boat road home door book milk rice corn lamp "
         "song note bell drum harp time life love hope play stop help call send echo code data wave tone beat "
         "radio music hello night light water earth green house train ocean river").split()
DTMF_KEYS = "123456789*0#"
DTMF_LOW = {k: f for keys, f in [("123", 697), ("456", 770), ("789", 852), ("*0#", 941)] for k in keys}
DTMF_HIGH = {k: f for keys, f in [("147*", 1209), ("2580", 1336), ("369#", 1477)] for k in keys}
DTMF_WORDS = {**{str(i): NUMBER_WORDS[i] for i in range(10)}, "*": "star", "#": "pound"}

def midi_hz(m):
    return 440.0 * 2.0 ** ((m - 69) / 12.0)

def midi_name(m):
    return f"{NOTE_NAMES[m % 12]}{m // 12 - 1}"

def envelope(n, attack=0.01, release=0.05, sr=SAMPLE_RATE):
    a, r = max(1, int(attack * sr)), max(1, int(release * sr))
    env = np.ones(n, np.float32)
    env[:a] = np.linspace(0, 1, a, dtype=np.float32)[:n]
    env[-r:] *= np.linspace(1, 0, r, dtype=np.float32)[-n:]
    return env

def tone(instrument, hz, dur, rng, sr=SAMPLE_RATE):
    """One note of an instrument, band-limited (additive harmonics below Nyquist), peak ~1."""
    n = int(dur * sr)
    t = np.arange(n) / sr
    if instrument == "plucked string":               # Karplus-Strong: a noise burst through a damped, averaging delay loop
        p = max(2, int(round(sr / hz - 0.5)))        # the two-tap average adds half a sample of delay
        y = np.zeros(n + p + 1)
        burst = np.convolve(rng.uniform(-1, 1, p + 5), [0.25, 0.5, 0.25], "valid")[:p + 1]   # a softer pluck
        y[:p + 1] = burst - burst.mean()
        i = p + 1
        while i < len(y):                            # y[i] needs y[i-p] and y[i-p+1]: blocks of p-1 samples are independent
            j = min(len(y), i + p - 1)
            y[i:j] = 0.996 * 0.5 * (y[i - p:j - p] + y[i - p + 1:j - p + 1])
            i = j
        y = y[:n]
        y = y / (np.abs(y).max() + 1e-9)
        return (y * envelope(n, 0.002, 0.03)).astype(np.float32)
    if instrument == "bell":                         # FM: inharmonic partials, exponential decay
        y = np.sin(2 * np.pi * hz * t + 2.0 * np.exp(-t * 3) * np.sin(2 * np.pi * hz * 1.4 * t))
        return (y * np.exp(-t * 2.5) * envelope(n, 0.002, 0.05)).astype(np.float32)
    kmax = int((sr / 2 * 0.9) // hz)
    if instrument == "sine":
        y = np.sin(2 * np.pi * hz * t)
    elif instrument == "square":
        ks = np.arange(1, kmax + 1, 2)
        y = (np.sin(2 * np.pi * hz * np.outer(ks, t)) / ks[:, None]).sum(0) * 4 / np.pi
    else:  # sawtooth
        ks = np.arange(1, kmax + 1)
        y = (np.sin(2 * np.pi * hz * np.outer(ks, t)) * ((-1.0) ** (ks + 1) / ks)[:, None]).sum(0) * 2 / np.pi
    y = y / (np.abs(y).max() + 1e-9)
    return (y * envelope(n)).astype(np.float32)

def place(buf, x, start):
    end = min(len(buf), start + len(x))
    if end > start:
        buf[start:end] += x[:end - start]

def fmt_list(items):
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]

def make_music(rng, max_dur):
    """A note, interval, chord or short melody on one instrument. Returns wav + text fields."""
    inst = INSTRUMENTS[rng.integers(len(INSTRUMENTS))]
    noun, adj = INSTRUMENT_TEXT[inst]
    form = ["note", "interval", "chord", "melody"][rng.integers(4)]
    root = int(rng.integers(48, 73))                 # C3 .. C5
    labels = {"class": inst, "instrument": inst}
    qa = [{"q": "what instrument is playing?", "a": noun[2:] if noun.startswith("a ") else noun}]
    if form == "note":
        dur = float(rng.uniform(1.0, max_dur))
        wav = np.zeros(int(dur * SAMPLE_RATE), np.float32)
        place(wav, tone(inst, midi_hz(root), dur - 0.1, rng), int(0.05 * SAMPLE_RATE))
        name = midi_name(root)
        labels["pitch"] = name
        caption = f"{noun} plays the note {name}."
        story = f"A single note, {name}, is played on {noun}, held for about {dur:.0f} second{'s' if round(dur) != 1 else ''}."
        qa += [{"q": "what note is played?", "a": name}, {"q": "how many notes are played?", "a": "one"}]
        notes = [root]
    elif form == "chord":
        quality = list(CHORDS)[rng.integers(len(CHORDS))]
        notes = [root + i for i in CHORDS[quality]]
        dur = float(rng.uniform(1.2, max_dur))
        wav = np.zeros(int(dur * SAMPLE_RATE), np.float32)
        for m in notes:
            place(wav, tone(inst, midi_hz(m), dur - 0.1, rng) / len(notes) * 1.5, int(0.05 * SAMPLE_RATE))
        chord = f"{NOTE_NAMES[root % 12]} {quality}"
        labels["chord"] = chord
        labels["pitch"] = midi_name(root)
        caption = f"{noun} plays a {chord} chord."
        story = (f"Three notes sound together on {noun}: {fmt_list([midi_name(m) for m in notes])}, "
                 f"a {chord} chord{' that sounds bright and happy' if quality == 'major' else ' that sounds dark and sad' if quality == 'minor' else ' that sounds tense and unresolved'}.")
        qa += [{"q": "what chord is played?", "a": chord}, {"q": "is the chord major or minor?", "a": quality},
               {"q": "how many notes sound together?", "a": "three"}]
    else:
        if form == "interval":
            semis = list(INTERVALS)[rng.integers(len(INTERVALS))]
            kind = INTERVALS[semis]
            up = bool(rng.integers(2))
            notes = [root, root + semis] if up else [root + semis, root]
            shape = f"a {'rising' if up else 'falling'} {kind}"
        else:
            pattern = ["arpeggio", "scale"][rng.integers(2)]
            quality = ["major", "minor"][rng.integers(2)]
            steps = CHORDS[quality] + [12] if pattern == "arpeggio" else ([0, 2, 4, 5, 7] if quality == "major" else [0, 2, 3, 5, 7])
            k = int(rng.integers(3, len(steps) + 1))
            steps = steps[:k]
            up = bool(rng.integers(2))
            notes = [root + s for s in (steps if up else steps[::-1])]
            shape = f"a {'rising' if up else 'falling'} {NOTE_NAMES[root % 12]} {quality} {pattern}"
        note_dur = float(min(rng.uniform(0.25, 0.5), (max_dur - 0.2) / len(notes)))
        dur = note_dur * len(notes) + 0.2
        wav = np.zeros(int(dur * SAMPLE_RATE), np.float32)
        for j, m in enumerate(notes):
            place(wav, tone(inst, midi_hz(m), note_dur * 1.1, rng), int((0.05 + j * note_dur) * SAMPLE_RATE))
        direction = "rising" if notes[-1] > notes[0] else "falling"
        labels["pitch"] = midi_name(notes[0])
        labels["melody"] = shape[2:]
        caption = f"{noun} plays {shape}."
        story = (f"{noun.capitalize()} plays {NUMBER_WORDS[len(notes)]} notes one after another, "
                 f"{fmt_list([midi_name(m) for m in notes])}, {direction} from {midi_name(notes[0])} to {midi_name(notes[-1])}.")
        qa += [{"q": "how many notes are played?", "a": NUMBER_WORDS[len(notes)]},
               {"q": "does the melody go up or down?", "a": "up" if direction == "rising" else "down"},
               {"q": "what is the first note?", "a": midi_name(notes[0])}]
    labels["form"] = form
    register = "low" if np.mean(notes) < 55 else "high" if np.mean(notes) > 67 else "middle"
    description = (f"{story} The sound is {adj}. It sits in a {register} register "
                   f"and nothing else can be heard, so it feels like a quiet music lesson.")
    gain = float(rng.uniform(0.3, 0.7))
    wav = wav / (np.abs(wav).max() + 1e-9) * gain
    return wav, dict(kind="music", caption=caption, description=description, labels=labels, qa=qa, transcript=None,
                     notes=notes)

def event_sound(event, rng, sr=SAMPLE_RATE):
    if event == "beep":
        hz = float(rng.choice([800, 1000, 1200]))
        n = int(0.15 * sr)
        return np.sin(2 * np.pi * hz * np.arange(n) / sr).astype(np.float32) * envelope(n, 0.005, 0.01)
    if event == "chirp":
        n = int(0.25 * sr)
        t = np.arange(n) / sr
        f0, f1 = 500.0, 3000.0
        phase = 2 * np.pi * (f0 * t + (f1 - f0) * t ** 2 / (2 * t[-1]))
        return np.sin(phase).astype(np.float32) * envelope(n, 0.005, 0.02)
    if event == "noise burst":
        n = int(0.2 * sr)
        return (rng.uniform(-1, 1, n) * 0.8).astype(np.float32) * envelope(n, 0.005, 0.03)
    if event == "click":
        n = int(0.01 * sr)
        return (np.exp(-np.arange(n) / (0.001 * sr)) * np.sign(rng.uniform(-1, 1, n) + 0.5)).astype(np.float32)
    # siren: a tone wailing up and down twice a second
    n = int(1.0 * sr)
    t = np.arange(n) / sr
    freq = 900 + 400 * np.sin(2 * np.pi * 2.0 * t)
    return (np.sin(2 * np.pi * np.cumsum(freq) / sr) * 0.7).astype(np.float32) * envelope(n, 0.02, 0.05)

def make_events(rng, max_dur):
    """A count of one event, or two different events in order. Onsets are recorded (tests check them)."""
    ev = EVENTS[rng.integers(len(EVENTS))]
    seq = []
    if rng.random() < 0.6 or ev == "siren":
        count = 1 if ev == "siren" else int(rng.integers(1, 6))
        seq = [ev] * count
    else:
        ev2 = [e for e in EVENTS if e not in (ev, "siren")][rng.integers(3)]
        c1, c2 = int(rng.integers(1, 3)), int(rng.integers(1, 3))
        seq = [ev] * c1 + [ev2] * c2
    gap = 0.12 if len(seq) > 3 else 0.2
    parts = [event_sound(e, rng) for e in seq]
    while len(parts) > 1 and sum(len(p) for p in parts) / SAMPLE_RATE + 0.08 * (len(parts) - 1) + 0.3 > max_dur:
        parts.pop(); seq.pop()                       # keep every event whole inside the clip
    total = sum(len(p) for p in parts) / SAMPLE_RATE + gap * (len(seq) - 1) + 0.3
    gap = max(0.08, gap - max(0.0, total - max_dur) / max(1, len(seq) - 1))
    dur = sum(len(p) for p in parts) / SAMPLE_RATE + gap * (len(seq) - 1) + 0.3
    dur = min(max_dur, max(dur, float(rng.uniform(1.0, 1.8))))   # a lone click still gets a second of room
    wav = (rng.normal(0, 1, int(dur * SAMPLE_RATE)) * 0.002).astype(np.float32)   # faint background hiss
    t, onsets = 0.1 + float(rng.uniform(0, 0.05)), []
    for p in parts:
        onsets.append(int(t * SAMPLE_RATE))
        place(wav, p * float(rng.uniform(0.5, 0.8)), onsets[-1])
        t += len(p) / SAMPLE_RATE + gap
    groups = []
    for e in seq:
        if groups and groups[-1][0] == e:
            groups[-1][1] += 1
        else:
            groups.append([e, 1])
    said = [f"{NUMBER_WORDS[c]} {EVENT_PLURAL[e] if c > 1 else e}" for e, c in groups]
    labels = {"class": groups[0][0], "event": groups[0][0], "count": str(groups[0][1])}
    if len(groups) == 1:
        e, c = groups[0]
        caption = f"{said[0]}." if e != "siren" else "a siren wails up and down."
        qa = [{"q": f"how many {EVENT_PLURAL[e]} are there?", "a": NUMBER_WORDS[c]},
              {"q": "what sound is this?", "a": e}]
        story = (f"In a quiet room, {EVENT_TEXT[e]} is heard" +
                 (f", then it repeats until there are {NUMBER_WORDS[c]} of them, evenly spaced." if c > 1 else " just once."))
    else:
        labels["order"] = " then ".join(e for e, _ in groups)
        labels["count_2"] = str(groups[1][1])
        caption = f"{said[0]} followed by {said[1]}."
        qa = [{"q": "which sound comes first?", "a": groups[0][0]}, {"q": "which sound comes last?", "a": groups[1][0]},
              {"q": f"how many {EVENT_PLURAL[groups[1][0]]} are there?", "a": NUMBER_WORDS[groups[1][1]]}]
        story = (f"First comes {EVENT_TEXT[groups[0][0]]}" + (f", {NUMBER_WORDS[groups[0][1]]} times" if groups[0][1] > 1 else "") +
                 f". After a short pause it changes to {EVENT_TEXT[groups[1][0]]}" +
                 (f", heard {NUMBER_WORDS[groups[1][1]]} times" if groups[1][1] > 1 else "") + ".")
    description = f"{story} Between the sounds there is only a faint hiss, like an empty room with a machine signalling."
    return wav, dict(kind="events", caption=caption, description=description, labels=labels, qa=qa, transcript=None,
                     onsets=onsets, sequence=seq)

def morse_envelope(word, unit):
    """On/off sample mask for a word: dot 1 unit, dash 3, gap 1 inside a letter, 3 between letters."""
    on = []
    for li, ch in enumerate(word):
        if li:
            on += [0] * 3
        for si, sym in enumerate(MORSE[ch]):
            if si:
                on += [0]
            on += [1] * (1 if sym == "." else 3)
    return np.repeat(np.array(on, np.float32), int(unit * SAMPLE_RATE))

def make_morse(rng, max_dur):
    unit = float(rng.uniform(0.045, 0.07))
    fits = [w for w in WORDS if len(morse_envelope(w, unit)) / SAMPLE_RATE + 0.3 <= max_dur] or ["e"]
    word = fits[rng.integers(len(fits))]
    hz = float(rng.choice([500, 600, 700, 800]))
    env = morse_envelope(word, unit)
    lead = int(0.15 * SAMPLE_RATE)
    wav = np.zeros(len(env) + 2 * lead, np.float32)
    smooth = np.convolve(env, np.hanning(int(0.004 * SAMPLE_RATE)) / np.hanning(int(0.004 * SAMPLE_RATE)).sum(), "same")
    wav[lead:lead + len(env)] = np.sin(2 * np.pi * hz * np.arange(len(env)) / SAMPLE_RATE) * smooth * float(rng.uniform(0.4, 0.7))
    wpm = round(1.2 / unit)
    caption = f"morse code spelling the word {word}."
    description = (f"A steady {int(hz)} hertz tone taps out morse code at about {wpm} words per minute. "
                   f"The dots and dashes spell {fmt_list(list(word))}, the word {word}, like a radio operator signalling.")
    qa = [{"q": "what word is spelled in morse code?", "a": word},
          {"q": "how many letters are sent?", "a": NUMBER_WORDS[len(word)] if len(word) <= 10 else str(len(word))},
          {"q": "what is the first letter?", "a": word[0]}]
    return wav, dict(kind="morse", caption=caption, description=description, transcript=word,
                     labels={"class": "morse code", "word": word}, qa=qa, unit=unit)

def make_dtmf(rng, max_dur):
    tone_dur, gap = float(rng.uniform(0.08, 0.12)), float(rng.uniform(0.06, 0.1))
    most = max(1, int((max_dur - 0.3) // (tone_dur + gap)))
    k = int(rng.integers(min(3, most), min(7, most) + 1))
    digits = "".join(DTMF_KEYS[i] for i in rng.integers(len(DTMF_KEYS), size=k))
    n = int((0.3 + k * (tone_dur + gap)) * SAMPLE_RATE)
    wav = np.zeros(n, np.float32)
    nt = int(tone_dur * SAMPLE_RATE)
    t = np.arange(nt) / SAMPLE_RATE
    amp = float(rng.uniform(0.25, 0.4))
    for j, d in enumerate(digits):
        x = (np.sin(2 * np.pi * DTMF_LOW[d] * t) + np.sin(2 * np.pi * DTMF_HIGH[d] * t)) * amp * envelope(nt, 0.003, 0.003)
        place(wav, x.astype(np.float32), int((0.15 + j * (tone_dur + gap)) * SAMPLE_RATE))
    spoken = " ".join(DTMF_WORDS[d] for d in digits)
    caption = f"telephone keypad tones dialing {spoken}."
    description = (f"Someone dials a phone: {NUMBER_WORDS[k]} keypad tones, each a chord of two pitches. "
                   f"The keys pressed are {spoken}, in a quick, even rhythm.")
    qa = [{"q": "what number is dialed?", "a": spoken}, {"q": "how many keys are pressed?", "a": NUMBER_WORDS[k]}]
    return wav, dict(kind="dtmf", caption=caption, description=description, transcript=spoken,
                     labels={"class": "dtmf tones", "digits": digits}, qa=qa)

def make_mixture(rng, max_dur):
    music, m = make_music(rng, max_dur)
    ev, e = make_events(rng, max_dur)
    n = max(len(music), len(ev))
    wav = np.zeros(n, np.float32)
    place(wav, music * 0.6, 0)
    place(wav, ev, 0)
    inst = m["labels"]["instrument"]
    ev_name = e["labels"]["event"]
    count = int(e["labels"]["count"])
    noun = INSTRUMENT_TEXT[inst][0]
    ev_said = (f"{NUMBER_WORDS[count]} {EVENT_PLURAL[ev_name] if count > 1 else ev_name}")
    if "order" in e["labels"]:
        ev_said += f" and then {e['caption'].split(' followed by ')[1].rstrip('.')}"
    caption = f"{ev_said} over {noun} playing {m['caption'].split(' plays ')[1].rstrip('.')}."
    labels = {"class": ev_name, "event": ev_name, "count": e["labels"]["count"], "instrument": inst}
    for key in ("pitch", "chord", "melody", "order"):
        if key in m["labels"]:
            labels[key] = m["labels"][key]
        if key in e["labels"]:
            labels[key] = e["labels"][key]
    qa = [{"q": "what instrument plays in the background?", "a": noun[2:]},
          {"q": f"how many {EVENT_PLURAL[ev_name]} are heard over the music?", "a": NUMBER_WORDS[count]},
          {"q": "what sound interrupts the music?", "a": ev_name}]
    qa += [q for q in m["qa"][1:2]]
    description = (f"Music and other sounds overlap. {m['description'].split(' The sound is ')[0]} "
                   f"Over the music, {e['description'].split(' Between the sounds')[0][0].lower()}"
                   f"{e['description'].split(' Between the sounds')[0][1:]} The two do not belong together, as if "
                   f"an alarm went off during a music lesson.")
    return wav, dict(kind="mixture", caption=caption, description=description, labels=labels, qa=qa, transcript=None,
                     onsets=e["onsets"], sequence=e["sequence"], notes=m["notes"])

KIND_MIX = [("music", 0.32, make_music), ("events", 0.24, make_events), ("morse", 0.14, make_morse),
            ("dtmf", 0.14, make_dtmf), ("mixture", 0.16, make_mixture)]

def synth_clip(seed, i, max_dur):
    """Clip i of the built-in corpus; depends only on (seed, i), so a bigger --clips keeps the smaller corpus."""
    rng = np.random.default_rng([seed, i])
    r, acc = rng.random(), 0.0
    for kind, p, fn in KIND_MIX:
        acc += p
        if r < acc:
            break
    wav, info = fn(rng, max_dur)
    wav = np.clip(wav, -1, 1).astype(np.float32)
    short = int(min(1.0, max_dur) * SAMPLE_RATE) - len(wav)
    if short > 0:                                    # at least a second (a short morse word): trailing silence
        wav = np.concatenate([wav, np.zeros(short, np.float32)])
    info["id"] = f"synth-{i:06d}"
    info["source"] = f"synth:{kind}"
    return wav, info

def espeak_clip(text, i, voice="en"):
    """A sentence spoken by espeak-ng (if installed), as a speech clip."""
    with __import__("tempfile").TemporaryDirectory() as d:
        out = os.path.join(d, "s.wav")
        subprocess.run(["espeak-ng", "-v", voice, "-w", out, text], check=True, capture_output=True, timeout=60)
        wav = load_audio(out)
    return wav, dict(id=f"speech-{i:06d}", source="espeak-ng", kind="speech", transcript=text.lower(),
                     caption=f"a synthetic voice says: {text.lower()}",
                     description=(f"A flat, robotic computer voice reads out one short sentence, slowly and clearly: "
                                  f"\"{text.lower()}\". There is no music and no other sound."),
                     labels={"class": "speech", "voice": voice}, qa=[{"q": "what does the voice say?", "a": text.lower()}])

def espeak_sentences(rng, k):
    subj = ["the cat", "a red bird", "my brother", "the old ship", "a small dog", "the teacher", "the train", "our team"]
    verb = ["sees", "likes", "finds", "follows", "paints", "calls", "hears", "builds"]
    obj = ["the moon", "a green tree", "the river", "two boats", "the music", "a blue house", "the stars", "a song"]
    return [f"{subj[rng.integers(8)]} {verb[rng.integers(8)]} {obj[rng.integers(8)]}" for _ in range(k)]

# -----------------------------------------------------------------------------
# real datasets: listing items (path + text fields) with every problem reported, not raised

def librispeech_items(src, report):
    items, seen = [], set()
    for trans in sorted(Path(src).rglob("*.trans.txt")):
        for line in trans.read_text(errors="replace").splitlines():
            if not line.strip():
                continue
            uid, _, text = line.strip().partition(" ")
            audio = trans.parent / f"{uid}.flac"
            seen.add(audio.resolve())
            if not audio.exists():
                report(str(audio), f"listed in {trans.name} but the file is missing")
                continue
            if not text.strip():
                report(str(audio), "missing transcript (empty line)")
                continue
            spk, chap = (uid.split("-") + ["", ""])[:2]
            t = text.strip().lower()
            items.append(dict(path=str(audio), id=uid, source=f"librispeech:{uid}", kind="speech", transcript=t,
                              caption=None, description=None, labels={"class": "speech", "speaker": spk, "chapter": chap},
                              qa=[{"q": "what does the speaker say?", "a": t}]))
    for f in sorted(Path(src).rglob("*")):
        if f.is_file() and f.suffix.lower() in AUDIO_EXTS and f.resolve() not in seen:
            report(str(f), "missing transcript (no line in any .trans.txt)")
    if not items and not list(Path(src).rglob("*.trans.txt")):
        report(str(src), "no .trans.txt transcript files found")
    return items

def read_manifest(src, report):
    """manifest.jsonl or manifest.csv rows -> {relative path: row dict} (rows for the same file are merged)."""
    rows = []
    mj, mc = Path(src) / "manifest.jsonl", Path(src) / "manifest.csv"
    if mj.exists():
        for ln, line in enumerate(mj.read_text(errors="replace").splitlines(), 1):
            if line.strip():
                try:
                    rows.append((f"{mj.name}:{ln}", json.loads(line)))
                except json.JSONDecodeError as e:
                    report(f"{mj}:{ln}", f"bad JSON line ({e.msg})")
    elif mc.exists():
        with open(mc, newline="", errors="replace") as f:
            for ln, row in enumerate(csv.DictReader(f), 2):
                rows.append((f"{mc.name}:{ln}", row))
    else:
        return None
    out = {}
    for where, row in rows:
        name = row.get("file") or row.get("path") or row.get("audio") or row.get("file_name") or row.get("filename")
        if not name:
            report(f"{src}/{where}", "manifest row has no 'file' field")
            continue
        r = out.setdefault(name, {"qa": []})
        for key in ("caption", "transcript", "label", "description"):
            if row.get(key) and not r.get(key):
                r[key] = str(row[key]).strip()
        if row.get("question") and row.get("answer"):
            r["qa"].append({"q": str(row["question"]).strip(), "a": str(row["answer"]).strip()})
        for q in row.get("qa") or []:
            if isinstance(q, dict) and q.get("q") and q.get("a"):
                r["qa"].append({"q": str(q["q"]), "a": str(q["a"])})
    return out

def folder_items(src, report):
    src = Path(src)
    manifest = read_manifest(src, report)
    items = []
    files = sorted(f for f in src.rglob("*") if f.is_file())
    listed = set()
    if manifest is not None:
        for name, r in manifest.items():
            f = (src / name)
            if not f.is_file():
                report(str(f), "named in the manifest but the file is missing")
                continue
            listed.add(f.resolve())
    for f in files:
        rel = f.relative_to(src).as_posix()
        if f.name in ("manifest.csv", "manifest.jsonl") and f.parent == src:
            continue
        if f.suffix.lower() not in AUDIO_EXTS:
            report(str(f), f"not an audio file (extension '{f.suffix or 'none'}'), skipped")
            continue
        r = (manifest or {}).get(rel, {"qa": []})
        label = r.get("label") or (f.parent.name if f.parent != src else "sound")
        qa = list(r.get("qa", []))
        if r.get("label"):
            qa.append({"q": "what sound is this?", "a": r["label"]})
        items.append(dict(path=str(f), id=rel, source=f"folder:{rel}", kind="file" if not r.get("transcript") else "speech",
                          transcript=r.get("transcript"), caption=r.get("caption"), description=r.get("description"),
                          labels={"class": label}, qa=qa))
    return items

# -----------------------------------------------------------------------------
# output helpers

def atomic_write_text(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)

def is_val(clip_id, val_percent):
    """Deterministic split: a clip goes to val by a hash of its id (stable when the corpus grows)."""
    return int(hashlib.md5(clip_id.encode()).hexdigest()[:8], 16) % 1000 < val_percent * 10

# -----------------------------------------------------------------------------
# main

def get_args(argv=None):
    p = argparse.ArgumentParser(description="Prepare aligned EnCodec codes + log-mel + text for the audio LLMs.")
    p.add_argument("--dataset", default="synth", choices=["synth", "librispeech", "folder"],
                   help="synth: the built-in corpus; librispeech: FLAC + .trans.txt; folder: any audio (+ manifest)")
    p.add_argument("--src", default=None, help="input directory for librispeech / folder")
    p.add_argument("--name", default=None, help="output name: data/NAME/ (default: the dataset name)")
    p.add_argument("--out_dir", default=None, help="output directory (overrides data/NAME)")
    p.add_argument("--clips", type=int, default=2000, help="synth: number of clips")
    p.add_argument("--max_seconds", type=float, default=3.0, help="synth: longest clip in seconds")
    p.add_argument("--seed", type=int, default=1337, help="synth: corpus seed")
    p.add_argument("--espeak", action="store_true", help="synth: add spoken sentences made with espeak-ng (if installed)")
    p.add_argument("--espeak_clips", type=int, default=200, help="how many espeak-ng sentences")
    p.add_argument("--val_percent", type=float, default=10.0, help="percent of clips in the val split")
    p.add_argument("--codec_dir", default=None, help=f"directory with the pretrained {CODEC_FILE} (else hub cache, else offline)")
    p.add_argument("--offline_codec", action="store_true", help="use the offline fitted codec even if pretrained weights exist")
    p.add_argument("--kmeans_frames", type=int, default=16384, help="offline codec: encoder frames used to fit the codebooks")
    p.add_argument("--kmeans_iters", type=int, default=12, help="offline codec: k-means iterations per codebook")
    p.add_argument("--vocab_size", type=int, default=4096, help="offline BPE: largest vocab (the bytes + merges)")
    p.add_argument("--batch_seconds", type=float, default=16.0, help="audio seconds per EnCodec batch")
    p.add_argument("--strict", action="store_true", help="stop at the first bad input instead of skipping it")
    p.add_argument("--force", action="store_true", help="rebuild even if the output is complete")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)

def keep_freed_memory():
    """glibc returns every large freed block to the OS, so each conv's fresh buffer costs page faults: EnCodec
    then spends half its CPU time in the kernel. Keep freed memory in the heap instead (Linux/glibc only)."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 << 20)                    # M_MMAP_THRESHOLD: no mmap for blocks under 64 MiB
        libc.mallopt(-1, 64 << 20)                    # M_TRIM_THRESHOLD: keep up to 64 MiB of freed heap
    except (OSError, AttributeError):
        pass

def main(argv=None):
    args = get_args(argv)
    t_start = time.time()
    keep_freed_memory()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    name = args.name or args.dataset
    out = Path(args.out_dir or os.path.join("data", name))
    if args.dataset != "synth" and not args.src:
        sys.exit(f"--dataset={args.dataset} needs --src=DIR")
    if args.src and not Path(args.src).is_dir():
        sys.exit(f"--src={args.src}: not a directory")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.tmp[0-9]*"):              # half-written files of a run that crashed
        stale.unlink()
    # a re-run with the same arguments skips finished work
    key_args = {k: v for k, v in vars(args).items() if k not in ("force", "quiet", "strict")}
    args_hash = hashlib.md5(json.dumps(key_args, sort_keys=True).encode()).hexdigest()[:12]
    meta_path = out / "meta.json"
    if meta_path.exists() and not args.force:
        meta = json.loads(meta_path.read_text())
        if meta.get("args_hash") == args_hash:
            print(f"{out} is already prepared with these arguments (use --force to rebuild)")
            return out
        print(f"{out} holds data prepared with other arguments: rebuilding (the old files stay until the new ones are complete)")

    # --- problems with the input: one line each, counted, summarised at the end
    problems = Counter()
    def report(what, problem):
        if args.strict:
            sys.exit(f"error: {what}: {problem} (--strict)")
        problems[problem.split(" (")[0].split(":")[0]] += 1
        tqdm.write(f"skipping {what}: {problem}")

    # --- the codec
    weights_dir = None if args.offline_codec else find_codec_weights(args.codec_dir)
    if weights_dir:
        codec = pretrained_codec(weights_dir)
        codec_info = {"name": "encodec_24khz", "pretrained": True, "weights": str((weights_dir / CODEC_FILE).resolve()),
                      "bandwidth": BANDWIDTH}
        print(f"codec: pretrained EnCodec 24 kHz from {weights_dir / CODEC_FILE}")
    else:
        codec = offline_codec()
        codec_info = {"name": "encodec_24khz-offline", "pretrained": False, "weights": "codec.pt", "bandwidth": BANDWIDTH,
                      "note": "EnCodec architecture, seeded random weights, encoder output standardised, "
                              "codebooks fitted by k-means on this corpus; the decoder is untrained"}
        print("codec: OFFLINE EnCodec (no pretrained weights found): random seeded encoder/decoder, "
              f"{N_Q} residual codebooks fitted by k-means on this corpus, saved to {out / 'codec.pt'}")

    # --- the clips: a generator of (wav, info) in a fixed order
    if args.dataset == "synth":
        n_total = args.clips + (args.espeak_clips if args.espeak and shutil.which("espeak-ng") else 0)
        def clips():
            for i in range(args.clips):
                if f"synth-{i:06d}" not in done_ids:
                    yield synth_clip(args.seed, i, args.max_seconds)
            if args.espeak:
                if shutil.which("espeak-ng") is None:
                    print("--espeak: espeak-ng is not installed, skipping the spoken sentences")
                    return
                for j, s in enumerate(espeak_sentences(np.random.default_rng(args.seed), args.espeak_clips)):
                    if f"speech-{j:06d}" in done_ids:
                        continue
                    try:
                        yield espeak_clip(s, j)
                    except Exception as e:
                        report(f"espeak-ng '{s}'", f"synthesis failed ({e})")
    else:
        items = librispeech_items(args.src, report) if args.dataset == "librispeech" else folder_items(args.src, report)
        n_total = len(items)
        def clips():
            for it in items:
                if it["id"] in done_ids:
                    continue
                try:
                    wav = load_audio(it["path"])
                except BadAudio as e:
                    report(it["path"], str(e).split(": ", 1)[1] if ": " in str(e) else str(e))
                    continue
                info = {k: v for k, v in it.items() if k != "path"}
                yield wav, info

    # --- pass 1: audio -> encoder outputs + mel, in batches (the slow part), with partial results saved in
    # chunks so an interrupted run resumes where it stopped
    work = out / f".work-{args_hash}"
    if args.force:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(exist_ok=True)
    infos, embs, mels = [], [], []
    audio_seconds = resumed_seconds = 0.0
    pbar = tqdm(total=n_total, unit="clip", disable=args.quiet, desc="encode", smoothing=0.1)
    batch, chunk_id, chunk_infos, chunk_embs, chunk_mels = [], 0, [], [], []
    budget = int(args.batch_seconds * SAMPLE_RATE)

    def flush_batch():
        nonlocal audio_seconds
        if not batch:
            return
        wavs = [w for w, _ in batch]
        es = encode_emb(codec, wavs)
        for (w, info), e in zip(batch, es):
            m = log_mel(w)
            assert len(m) == len(e), (len(m), len(e))
            info = {k: v for k, v in info.items() if k in ("id", "source", "kind", "transcript", "caption", "description", "labels", "qa")}
            info["duration"] = round(len(w) / SAMPLE_RATE, 4)
            chunk_infos.append(info)
            chunk_embs.append(e.numpy())               # float32: codes must not depend on storage rounding
            chunk_mels.append(m.astype(np.float16))
            audio_seconds += len(w) / SAMPLE_RATE
        pbar.update(len(batch))
        pbar.set_postfix(audio_s=f"{audio_seconds:.0f}",
                         x_realtime=f"{(audio_seconds - resumed_seconds) / max(1e-9, time.time() - t_start):.1f}")
        batch.clear()

    def save_chunk():
        nonlocal chunk_id
        path = work / f"chunk{chunk_id:05d}.npz"
        tmp = work / f"chunk{chunk_id:05d}.tmp.npz"
        lens = np.array([len(e) for e in chunk_embs], np.int64)
        np.savez(tmp, emb=np.concatenate(chunk_embs), mel=np.concatenate(chunk_mels), lens=lens,
                 infos=np.array(json.dumps(chunk_infos)))
        os.replace(tmp, path)
        infos.extend(chunk_infos); embs.extend(chunk_embs); mels.extend(chunk_mels)
        chunk_infos.clear(); chunk_embs.clear(); chunk_mels.clear()
        chunk_id += 1

    CHUNK = 128
    done_chunks = sorted(work.glob("chunk*[0-9].npz"))
    for path in done_chunks:                          # resume: reload finished chunks
        z = np.load(path)
        ci = json.loads(str(z["infos"]))
        offs = np.concatenate([[0], np.cumsum(z["lens"])])
        for j, info in enumerate(ci):
            infos.append(info)
            embs.append(z["emb"][offs[j]:offs[j + 1]])
            mels.append(z["mel"][offs[j]:offs[j + 1]])
            audio_seconds += info["duration"]
        chunk_id += 1
    if done_chunks:
        print(f"resuming: {len(infos)} clips already encoded in {len(done_chunks)} chunks")
        done_ids = {info["id"] for info in infos}
    else:
        done_ids = set()
    pbar.update(len(infos))
    resumed_seconds = audio_seconds
    pending = []
    for wav, info in clips():
        if info["id"] in done_ids:
            continue
        pending.append((wav, info))
        if len(pending) >= CHUNK:
            for b in sorted(pending, key=lambda x: len(x[0])):
                batch.append(b)
                if sum(len(w) for w, _ in batch) >= budget:
                    flush_batch()
            flush_batch()
            save_chunk()
            pending = []
    for b in sorted(pending, key=lambda x: len(x[0])):
        batch.append(b)
        if sum(len(w) for w, _ in batch) >= budget:
            flush_batch()
    flush_batch()
    if chunk_infos:
        save_chunk()
    pbar.close()
    if not infos:
        sys.exit(f"error: no usable clips (skipped {sum(problems.values())} inputs); nothing written")

    # restore the corpus order (chunks are sorted by length inside)
    order = sorted(range(len(infos)), key=lambda i: infos[i]["id"])
    infos = [infos[i] for i in order]; embs = [embs[i] for i in order]; mels = [mels[i] for i in order]

    # every output file is first written next to its final name, then all are renamed at the end, so a run that
    # fails leaves the previous output as it was
    staged = []
    def stage(fname):
        staged.append(fname)
        return out / f"{fname}.tmp{os.getpid()}"

    # --- the offline codec: fit its codebooks on a sample of encoder outputs
    allemb = torch.from_numpy(np.concatenate(embs)).float()
    if not codec_info["pretrained"]:
        t0 = time.time()
        allemb = calibrate(codec, allemb)
        pick = np.random.default_rng(0).permutation(len(allemb))[:args.kmeans_frames]
        fit_codebooks(codec, allemb[torch.from_numpy(np.sort(pick))], iters=args.kmeans_iters)
        torch.save({"model": codec_state(codec), "fitted": True, "bandwidth": BANDWIDTH, "n_q": N_Q}, stage("codec.pt"))
        print(f"offline codec: fitted {N_Q} codebooks x {CODEBOOK_SIZE} on {len(pick)} frames in {time.time() - t0:.1f}s")

    # --- pass 2: quantize (cheap), tokenize, write the splits
    # quantizing is frame by frame, so all clips go through at once in big slices
    allcodes = torch.cat([quantize(codec, allemb[s:s + 16384]) for s in range(0, len(allemb), 16384)]).numpy().astype(np.uint16)
    bounds = np.cumsum([0] + [len(e) for e in embs])
    codes = [allcodes[bounds[i]:bounds[i + 1]] for i in range(len(embs))]

    texts = list(PROMPT_TEXT)
    for info in infos:
        texts += [info.get(k) or "" for k in ("transcript", "caption", "description")]
        texts += [q["q"] + " " + q["a"] for q in info.get("qa", [])]
        texts += [" ".join(f"{k} {v}" for k, v in info["labels"].items())]
    if gpt2_files_cached():
        import tiktoken
        tok = tiktoken.get_encoding("gpt2")
        tok_info = {"name": "gpt2", "vocab_size": tok.n_vocab, "eot_token": tok.eot_token,
                    "special_tokens": {EOT: tok.eot_token}, "file": None}
        print("tokenizer: GPT-2 (tiktoken, from its local cache)")
    else:
        t0 = time.time()
        ranks = train_bpe(texts, args.vocab_size)
        tok_name = f"{name}-bpe{len(ranks)}"
        save_ranks(ranks, stage("tokenizer.tiktoken"))
        tok = make_encoding(tok_name, ranks)
        tok_info = {"name": tok_name, "vocab_size": tok.n_vocab, "eot_token": tok.eot_token,
                    "special_tokens": {EOT: tok.eot_token}, "file": "tokenizer.tiktoken",
                    "note": "offline byte-level BPE trained on this corpus's text (GPT-2 files not available)"}
        print(f"tokenizer: OFFLINE byte-level BPE, {tok.n_vocab} tokens, trained in {time.time() - t0:.1f}s "
              f"(GPT-2's files are not in the tiktoken cache)")

    in_val = [is_val(info["id"], args.val_percent) for info in infos]
    if args.val_percent > 0 and len(infos) >= 2 and not any(in_val):
        in_val[-1] = True                             # a tiny dataset still gets a val clip (empty files cannot be mmapped)
    if all(in_val):
        in_val[0] = False
    splits = {}
    for split in ("train", "val"):
        idx = [i for i in range(len(infos)) if in_val[i] == (split == "val")]
        offset, lines = 0, []
        for i in idx:
            info = dict(infos[i])
            rec = {"id": info["id"], "offset": offset, "frames": len(codes[i]), "source": info["source"],
                   "kind": info["kind"], "duration": info["duration"], "transcript": info.get("transcript"),
                   "caption": info.get("caption"), "description": info.get("description"),
                   "labels": info["labels"], "qa": info.get("qa", []), "tokens": {}}
            for k in ("transcript", "caption"):
                if rec[k]:
                    rec["tokens"][k] = tok.encode_ordinary(rec[k])
            lines.append(json.dumps(rec))
            offset += len(codes[i])
        c = np.concatenate([codes[i] for i in idx]) if idx else np.zeros((0, N_Q), np.uint16)
        m = np.concatenate([mels[i] for i in idx]) if idx else np.zeros((0, N_MELS), np.float16)
        np.ascontiguousarray(c, dtype=np.uint16).tofile(stage(f"{split}_codes.bin"))
        np.ascontiguousarray(m, dtype=np.float16).tofile(stage(f"{split}_mel.bin"))
        stage(f"{split}_clips.jsonl").write_text("".join(l + "\n" for l in lines))
        splits[split] = {"clips": len(idx), "frames": int(offset)}

    wall = time.time() - t_start
    meta = {
        "sample_rate": SAMPLE_RATE, "frame_rate": FRAME_RATE, "hop_length": HOP, "n_fft": N_FFT, "n_mels": N_MELS,
        "mel": {"fmin": F_MIN, "fmax": F_MAX, "scale": "htk", "norm": "none (triangles of peak 1)", "window": "hann (periodic)",
                "center_sample": f"frame i is centred on sample {HOP}*i + {MEL_CENTER}; it sees {MEL_LOOKAHEAD} samples past its block",
                "log": f"(log10(max(mel_power, {LOG_FLOOR})) + 4) / 4, power scaled so a full-scale sine's bin is ~1 (0 dB -> 1, floor -> -1)"},
        "n_q": N_Q, "codebook_size": CODEBOOK_SIZE, "codec": codec_info, "tokenizer": tok_info, "splits": splits,
        "dataset": args.dataset, "audio_seconds": round(audio_seconds, 2),
        "skipped": dict(problems), "args": vars(args), "args_hash": args_hash,
    }
    stage("meta.json").write_text(json.dumps(meta, indent=2))
    if meta_path.exists():
        meta_path.unlink()                            # no meta.json = incomplete, while the files are swapped
    for fname in staged:                              # meta.json last
        os.replace(out / f"{fname}.tmp{os.getpid()}", out / fname)
    shutil.rmtree(work, ignore_errors=True)
    for old in out.glob(".work-*"):
        shutil.rmtree(old, ignore_errors=True)
    cs = np.concatenate(codes)
    print(f"wrote {out}: train {splits['train']['clips']} clips / {splits['train']['frames']} frames, "
          f"val {splits['val']['clips']} clips / {splits['val']['frames']} frames; "
          f"codes use {len(np.unique(cs[:, 0]))} of {CODEBOOK_SIZE} values in codebook 0")
    if problems:
        print(f"skipped {sum(problems.values())} inputs: " + ", ".join(f"{n} x {p}" for p, n in problems.most_common()))
    done_now = audio_seconds - resumed_seconds
    print(f"done: {done_now:.1f} s of audio processed in {wall:.1f} s wall = {done_now / wall:.2f} audio-seconds per second"
          + (f" ({resumed_seconds:.1f} s more resumed from an earlier run)" if resumed_seconds else ""))
    return out

if __name__ == "__main__":
    main()
