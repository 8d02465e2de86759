"""
The data contract, as openai/whisper's audio.py is Whisper's. It holds the fixed numbers (24 kHz,
75 frames per second, 8 codebooks, 64 mel bins), audio I/O and our resampler, the log-mel framed
like the codec, Whisper's own log-mel, and the EnCodec 24 kHz codec at run time: found, downloaded
or loaded with the data, encoding, and decoding as a stream.

prepare.py makes the data with these; sample.py, whisper_gpt_table.py and the tests use them:
load_codec(data_dir), load_audio(path), resample(wav, sr_in, sr_out), log_mel(wav),
whisper_log_mel(wav), features(wav, codec), StreamingDecoder(codec), plot_mels(path, panels).
Fitting the offline codec on a corpus is codec.py's.
"""
import os
import re
import sys
import json
import hashlib
import math
import struct
import time
import types
import warnings
from pathlib import Path

import numpy as np
import torch
import soundfile as sf

# encodec imports torchaudio only for file helpers we never call, and the registry's torchaudio
# wheels do not load against the CPU torch: an empty module stands in
try:
    import torchaudio  # noqa: F401
except Exception:
    sys.modules["torchaudio"] = types.ModuleType("torchaudio")
from encodec import EncodecModel  # noqa: E402
from encodec.modules.conv import SConv1d, SConvTranspose1d  # noqa: E402
from encodec.modules.conv import pad1d as encodec_pad1d  # noqa: E402
from encodec.modules.lstm import SLSTM  # noqa: E402
from encodec.modules.seanet import SEANetResnetBlock  # noqa: E402

# -----------------------------------------------------------------------------
# the data contract's fixed numbers

SAMPLE_RATE = 24000
HOP = 320               # EnCodec 24 kHz stride: 75 frames/s
FRAME_RATE = SAMPLE_RATE // HOP
N_Q = 8                 # codebooks at 6 kbps
BANDWIDTH = 6.0
CODEBOOK_SIZE = 1024
N_MELS = 64
N_FFT = 640             # 26.7 ms window; 37.5 Hz bins, so no low mel filter is empty
F_MIN, F_MAX = 0.0, SAMPLE_RATE / 2
# mel frame i is centred on the middle of codec frame i's block [320*i, 320*(i+1)), so both describe
# the same 13.3 ms (docs/data.md, "Alignment")
MEL_CENTER = HOP // 2
# samples of the next block a mel frame sees (160): where its window ends (MEL_CENTER + N_FFT/2)
# past where its block ends (HOP)
MEL_LOOKAHEAD = MEL_CENTER + N_FFT // 2 - HOP
LOG_FLOOR = 1e-8        # -80 dB
AUDIO_EXTS = {".wav", ".flac", ".ogg", ".opus", ".mp3", ".aiff", ".aif", ".aifc", ".au", ".caf",
              ".w64"}
# the longest clip read to be encoded: the codec encodes a clip whole, ~16 MB of memory a second
MAX_CLIP_SECONDS = 120
MIN_SAMPLE_RATE = 4000  # below it a header's rate is a mistake, not audio
CODEC_FILE = "encodec_24khz-d7cc33bc.th"

def n_frames(n_samples):
    """Frames EnCodec gives for n samples (and so the mel too)."""
    return -(-n_samples // HOP)

# -----------------------------------------------------------------------------
# audio I/O and resampling (our own: torchaudio is not usable with the CPU torch)

_kernels = {}

def _resample_kernels(up, down, zeros=24, beta=8.0):
    """Polyphase windowed-sinc filters: one row per output phase p = (n * down) % up."""
    key = (up, down, zeros, beta)
    if key not in _kernels:
        cutoff = 0.97 * min(1.0, up / down)  # of the input Nyquist; 3% for the transition band
        half = int(math.ceil(zeros / cutoff))        # taps each side, in input samples
        taps = np.arange(-half, half + 2)            # input offsets relative to floor(t)
        # fractional position of the output between input samples
        phase = np.arange(up)[:, None] / up
        x = taps[None, :] - phase                    # distance in input samples
        w = np.kaiser(2 * half + 3, beta)            # a smooth window over |x| <= half + 1
        w = np.interp(x, np.linspace(-half - 1, half + 1, 2 * half + 3), w)
        k = cutoff * np.sinc(cutoff * x) * w
        k /= k.sum(axis=1, keepdims=True)            # unit DC gain per phase
        _kernels[key] = (taps, k.astype(np.float32))
    return _kernels[key]

def resample(wav, sr_in, sr_out=SAMPLE_RATE):
    """Band-limited resampling of a 1-D float array by a rational factor (polyphase windowed sinc,
    Kaiser window). Output length is ceil(len * sr_out / sr_in); output sample n sits at input time
    n * sr_in / sr_out."""
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
    """Audio that cannot be used. str(e) is "{name}: {reason}"; e.reason is the reason alone, as a
    file's name may itself hold ": "."""

    def __init__(self, name, reason):
        super().__init__(f"{name}: {reason}")
        self.reason = reason

def check_audio(wav, name="audio"):
    """Raise BadAudio with a clear reason if a 24 kHz clip cannot be used."""
    if wav.size == 0:
        raise BadAudio(name, "zero-length audio (0 samples)")
    if not np.all(np.isfinite(wav)):
        raise BadAudio(name, "contains NaN or infinite samples")
    if wav.size < HOP:
        raise BadAudio(name, f"shorter than one frame ({wav.size} samples < {HOP} at "
                             f"{SAMPLE_RATE} Hz)")
    peak = np.abs(wav).max()
    if peak < 1e-4:
        raise BadAudio(name, f"all silent (peak {peak:.1e})")
    if peak > 100:  # 40 dB over full scale: the mel of such audio is out of range
        raise BadAudio(name, f"peak amplitude over 100 ({peak:.3g}, where full "
                             f"scale is 1: float samples written at integer scale? divide them "
                             f"by 32768)")

def wav_data_bytes(path):
    """(bytes of audio a WAV file's data chunk declares, bytes the file holds after its header), or
    None for another format or a streamed WAV's placeholder size (0, or 2 or 4 GiB)."""
    with open(path, "rb") as f:
        head = f.read(12)
        if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        pos, size = 12, os.path.getsize(path)
        while pos + 8 <= size:
            f.seek(pos)
            chunk, n = struct.unpack("<4sI", f.read(8))
            if chunk == b"data":
                # sox writes 0x7ffff000 (rounded to its block) when it cannot seek back
                return (n, size - pos - 8) if 0 < n < 0x7FFFF000 - 4096 else None
            pos += 8 + n + (n & 1)  # chunks are padded to an even size
    return None

def load_audio(path, max_seconds=MAX_CLIP_SECONDS):
    """Read any file libsndfile reads (wav, flac, ogg, ...), downmix to mono, resample to 24 kHz.
    Returns float32 np array. Raises BadAudio (a ValueError) naming the file and the problem, a clip
    over max_seconds among them (None: any length, for audio that is not encoded). A WAV file cut
    short (libsndfile reads what there is) is read, with a line that says so."""
    path = str(path)
    try:
        data, file_sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:
        why = str(e).strip()[:120]
        if os.path.isfile(path) and "does not exist" in why:
            # libsndfile's words for some files it cannot decode (text named .mp3)
            why = "libsndfile cannot open it as audio"
        raise BadAudio(path, f"unreadable or corrupt audio ({type(e).__name__}: {why})")
    if file_sr < MIN_SAMPLE_RATE:  # resampling it would make hours of audio of a second
        raise BadAudio(path, f"not an audio rate: a sample rate of {file_sr} Hz (at least "
                             f"{MIN_SAMPLE_RATE} Hz)")
    if max_seconds is not None and len(data) > max_seconds * file_sr:
        seconds = len(data) / file_sr  # (120.01 s is not "120 s, over the 120 s")
        shown = f"{seconds:.0f}" if seconds >= max_seconds + 1 else f"{seconds:.3f}".rstrip("0")
        raise BadAudio(path, f"too long to encode: {shown} s, over the "
                             f"{max_seconds} s a clip may last (the codec encodes a clip whole): "
                             f"split it")
    wav = data.mean(axis=1)
    if data.shape[1] > 1 and wav.size and np.abs(wav).max() < 1e-4 <= np.abs(data).max():
        raise BadAudio(path, f"channels that cancel when mixed to mono: {data.shape[1]} (peak "
                             f"{np.abs(data).max():.2g} in a channel, {np.abs(wav).max():.1e} "
                             f"mixed): a channel inverted?")
    if wav.size and np.all(np.isfinite(wav)):
        wav = resample(wav, file_sr, SAMPLE_RATE)
    check_audio(wav, path)
    declared = wav_data_bytes(path)
    if declared and declared[1] < declared[0]:  # a usable clip, said to be short
        print(f"warning: {path}: cut short? its header declares {declared[0]:,} bytes of audio, "
              f"the file holds {declared[1]:,}: reading the {len(data) / file_sr:.2f} s there are",
              file=sys.stderr)
    return wav

# -----------------------------------------------------------------------------
# log-mel spectrogram, framed exactly like the codec (see MEL_CENTER above)

def mel_filterbank(n_mels=N_MELS, n_fft=N_FFT, sr=SAMPLE_RATE, fmin=F_MIN, fmax=F_MAX):
    """Triangular filters on the HTK mel scale with peak 1 (no area norm, so a pure tone reads about
    the same at any frequency), (n_mels, n_fft//2 + 1)."""
    hz2mel = lambda f: 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)
    mel2hz = lambda m: 700.0 * (10.0 ** (np.asarray(m) / 2595.0) - 1.0)
    edges = mel2hz(np.linspace(hz2mel(fmin), hz2mel(fmax), n_mels + 2))
    freqs = np.arange(n_fft // 2 + 1) * sr / n_fft
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    fb = np.maximum(0.0, np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)))
    return fb.astype(np.float32)

_mel_cache = {}

def log_mel(wav):
    """Log-mel spectrogram: (n,) or (B, n) audio at 24 kHz -> (frames, 64) or (B, frames, 64),
    frames = ceil(n/320). Takes numpy or torch and returns the same kind, float32 even under a
    caller's bfloat16 autocast. Values are (log10(mel power) + 4) / 4, with the power scaled so a
    full-scale sine reads ~0 dB: such a tone gives ~1, silence -1 (the -80 dB floor)."""
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
    with torch.autocast(x.device.type, enabled=False):
        spec = torch.fft.rfft(frames * win, dim=-1)
        power = spec.real ** 2 + spec.imag ** 2
        power = power * (4.0 / win.sum() ** 2)       # amplitude-1 sine -> peak bin power ~1
        mel = power @ fb.T                            # (B, T, n_mels)
    out = (torch.log10(mel.clamp_min(LOG_FLOOR)) + 4.0) / 4.0
    if squeeze:
        out = out[0]
    return out.numpy() if is_np else out

def plot_mels(path, panels, title=None, boundary=None):
    """A PNG of log-mels (frames, n_mels) stacked one above the other: panels is a list of (name,
    mel). boundary, in seconds, draws a line (where a prompt ends and the continuation starts).
    Written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 1.9 * len(panels) + 0.4), squeeze=False)
    for ax, (name, mel) in zip(axes[:, 0], panels):
        mel = np.asarray(mel, np.float32)
        ax.imshow(mel.T, origin="lower", aspect="auto", vmin=-1, vmax=1, cmap="magma",
                  extent=[0, len(mel) / FRAME_RATE, 0, mel.shape[1]])
        ax.set_ylabel("mel bin")
        ax.set_title(name, fontsize=9, loc="left")
        if boundary is not None:
            ax.axvline(boundary, color="cyan", lw=1.5, ls="--")
    axes[-1, 0].set_xlabel("seconds")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97) if title else None)
    tmp = Path(f"{path}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)

# OpenAI Whisper's own input features (--whisper_mel), so a real Whisper encoder sees what it was
# trained on. They are framed like Whisper's, not like the codec: frame i is centred at i/100 s.
WHISPER_SR, WHISPER_N_FFT, WHISPER_HOP, WHISPER_N_MELS = 16000, 400, 160, 80
WHISPER_FRAME_RATE = WHISPER_SR // WHISPER_HOP     # 100 frames/s

def whisper_mel_filters():
    """The 80-bin Slaney filters openai-whisper ships, (80, 201): key "mel_80" of
    whisper/assets/mel_filters.npz. Found without importing whisper, whose __init__ imports numba,
    so pip install --no-deps openai-whisper is enough."""
    if "wfb" not in _mel_cache:
        from tokenizer import whisper_assets_dir
        assets = whisper_assets_dir()
        if assets is None:
            raise FileNotFoundError("whisper mel: openai-whisper is not installed, so its "
                                    "whisper/assets/mel_filters.npz cannot be found (pip install "
                                    "--no-deps openai-whisper)")
        path = assets / "mel_filters.npz"
        if not path.is_file():
            raise FileNotFoundError(f"whisper mel: {path} not found (pip install --no-deps "
                                    f"openai-whisper)")
        with np.load(path, allow_pickle=False) as f:
            _mel_cache["wfb"] = torch.from_numpy(f[f"mel_{WHISPER_N_MELS}"].astype(np.float32))
    return _mel_cache["wfb"]

def whisper_log_mel(wav, sr=SAMPLE_RATE):
    """Whisper's log-mel, as whisper.audio.log_mel_spectrogram, of a 1-D clip at sr -> (frames, 80)
    float32. The clip is resampled to 16 kHz (n16k samples); frames = n16k // 160, ~100 a second.
    The same as Whisper's on the clip padded to 30 s (the zeros only add frames at the floor) but
    for the last frame, which here sees the clip reflected where Whisper's sees the zeros."""
    x = np.asarray(wav, dtype=np.float32)
    if sr != WHISPER_SR:
        x = resample(x, sr, WHISPER_SR)
    x = torch.from_numpy(x)
    win = torch.hann_window(WHISPER_N_FFT)            # periodic, as Whisper's
    stft = torch.stft(x, WHISPER_N_FFT, WHISPER_HOP, window=win, center=True, pad_mode="reflect",
                      return_complex=True)
    power = stft[..., :-1].abs() ** 2                 # Whisper drops the last frame
    mel = whisper_mel_filters() @ power               # (80, frames)
    out = torch.clamp(mel, min=1e-10).log10()
    out = torch.maximum(out, out.max() - 8.0)
    return ((out + 4.0) / 4.0).T.contiguous().numpy()

# -----------------------------------------------------------------------------
# the codec: pretrained EnCodec 24 kHz whenever its weights can be had, else the offline one stored
# with the data (its architecture is here; codec.py fits it on the corpus)

def find_codec_weights(codec_dir=None):
    """Directory holding encodec_24khz-d7cc33bc.th: --codec_dir (a FileNotFoundError when the file
    is not there), else the torch hub cache, else None."""
    if codec_dir:
        if not (Path(codec_dir) / CODEC_FILE).is_file():
            raise FileNotFoundError(f"--codec_dir={codec_dir}: no {CODEC_FILE} there")
        return Path(codec_dir)
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    return hub if (hub / CODEC_FILE).is_file() else None

def encodec_24khz(pretrained, weights_dir=None):
    """EnCodec 24 kHz at BANDWIDTH, in eval mode. Pretrained: read from weights_dir, or with None
    downloaded by encodec's own loader into the torch hub cache; either way hash-checked."""
    warnings.filterwarnings("ignore", message=".*weight_norm.*deprecated")
    model = EncodecModel.encodec_model_24khz(
        pretrained=pretrained, repository=Path(weights_dir) if weights_dir else None)
    model.set_target_bandwidth(BANDWIDTH)
    return model.eval()

def read_pretrained_codec(weights_dir):
    """encodec_24khz with the pretrained weights in weights_dir, or a ValueError naming the file
    when it is unusable (truncated or corrupt: a wrong hash, unreadable)."""
    try:
        return encodec_24khz(True, weights_dir)
    except Exception as e:
        raise ValueError(f"{Path(weights_dir) / CODEC_FILE}: unusable ({type(e).__name__}: "
                         f"{str(e).strip()[:120]})") from None

def get_pretrained_codec(codec_dir=None, offline=False, strict=False):
    """The pretrained EnCodec 24 kHz and its weights file: from --codec_dir, else the torch hub
    cache, else a download (not when offline). (None, None) when none can be had; the caller then
    makes the offline codec. Each failure prints one line naming the file or the cause, or with
    strict stops the run. A codec_dir without usable weights raises: FileNotFoundError when the
    file is not there, ValueError when it is unusable."""
    def failed(msg):
        if strict:
            sys.exit(f"error: {msg} (--strict)")
        print(f"codec: {msg}")
    weights_dir = find_codec_weights(codec_dir)
    if weights_dir:
        try:
            return read_pretrained_codec(weights_dir), weights_dir / CODEC_FILE
        except ValueError as problem:
            if codec_dir:  # named by the user: nothing is downloaded there, so an error
                raise ValueError(f"--codec_dir={codec_dir}: {problem}; put EnCodec's 24 kHz "
                                 f"weights file there") from None
            failed(f"{problem}; delete it to download it again")
            return None, None
    if offline:
        return None, None
    t0 = time.time()
    try:
        return encodec_24khz(True), Path(torch.hub.get_dir()) / "checkpoints" / CODEC_FILE
    except Exception as e:
        failed(f"downloading EnCodec's weights failed after {time.time() - t0:.1f}s "
               f"({type(e).__name__}: {str(e).strip()[:120]})")
        return None, None

def offline_codec(seed=1234):
    """EnCodec's architecture with its own (seeded) random weights and unfitted codebooks (all
    zeros). Seeds torch's global RNG (prepare.py's fitting goes on from that state)."""
    torch.manual_seed(seed)
    return encodec_24khz(False)

class Standardize(torch.nn.Module):
    """Per-channel (x - mean) / std on the encoder output (B, 128, T): the offline codec's
    calibration."""
    def __init__(self, dim=128):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, emb):
        """Mean and std per channel of emb (N, dim)."""
        self.mean.copy_(emb.mean(0))
        self.std.copy_(emb.std(0).clamp_min(1e-8))
        return self

    def forward(self, x):
        return (x - self.mean[:, None]) / self.std[:, None]

def read_offline_codec(data_dir, record):
    """The offline codec's saved state (codec.pt, as meta.json's record names it), or a ValueError
    naming the file: missing, truncated or corrupt, or never fitted."""
    path = Path(data_dir) / record["weights"]
    if not path.is_file():
        raise ValueError(f"{path}: the offline codec of {data_dir} is missing: re-run prepare.py "
                         f"for that data")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0].split(". ")[0][:160]  # a sentence
        raise ValueError(f"{path}: cannot be read, it is truncated or corrupt ({type(e).__name__}: "
                         f"{first}): re-run prepare.py --force for that data") from None
    if not isinstance(ckpt, dict) or not ckpt.get("fitted"):
        raise ValueError(f"{path}: the offline codec's codebooks were never fitted")
    return ckpt

def codec_record(data_dir):
    """meta.json's record of the codec that made data_dir's codes, or a ValueError naming what is
    wrong: no meta.json, no record, or data without codes (prepare.py --no_codes)."""
    meta_path = Path(data_dir) / "meta.json"
    try:
        c = json.loads(meta_path.read_text())["codec"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"{meta_path}: missing, or without the codec's record prepare.py "
                         f"writes") from None
    if c is None:
        raise ValueError(f"{data_dir} holds no codes: it was prepared with --no_codes (the mel "
                         f"and the text only, for SALMONN and Pengi), so there is no codec")
    return c

def load_codec(data_dir):
    """The EnCodec model the data in data_dir was made with (pretrained, or the offline fitted one
    saved there). The pretrained weights are read where prepare.py found them, else from the
    torch hub cache (the data may have moved to another machine)."""
    c = codec_record(data_dir)
    if c["pretrained"]:
        weights_dir = Path(c["weights"]).parent
        if not (weights_dir / CODEC_FILE).is_file():
            weights_dir = find_codec_weights()
        if weights_dir is None:
            raise ValueError(f"{data_dir} was coded with the pretrained EnCodec, whose weights "
                             f"({CODEC_FILE}) are neither at {c['weights']} nor in the torch hub "
                             f"cache ({torch.hub.get_dir()}/checkpoints)")
        # building the model draws random weights: from a fork of the CPU generator, so that the
        # caller's random stream goes on as if nothing was loaded (sample.py seeds it)
        try:
            with torch.random.fork_rng(devices=[]):
                return read_pretrained_codec(weights_dir)
        except ValueError as problem:
            raise ValueError(f"{problem}; delete it and run prepare.py to download it "
                             f"again") from None
    ckpt = read_offline_codec(data_dir, c)
    with torch.random.fork_rng(devices=[]):  # as above; every weight is overwritten below
        model = encodec_24khz(False)
    # the Standardize layers codec.calibrate appended to the encoder (prepare.py: one, for k-means)
    n_std = sum(1 for k in ckpt["model"] if re.fullmatch(r"encoder\.model\.\d+\.std", k))
    for _ in range(n_std):
        model.encoder.model.append(Standardize())
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    # codec.codec_state saves neither embed_avg nor the codebooks past N_Q
    unused = tuple(f"quantizer.vq.layers.{i}." for i in range(N_Q, len(model.quantizer.vq.layers)))
    if unexpected or any(not (k.endswith("embed_avg") or k.startswith(unused)) for k in missing):
        raise ValueError(f"{Path(data_dir) / c['weights']}: does not match this audio.py's offline "
                         f"codec (missing {sorted(missing)[:3]}, unexpected "
                         f"{sorted(unexpected)[:3]}): "
                         "re-run prepare.py --force")
    return model.eval()

_codec_ids = {}  # codec_id's hashes, per weights file version

def codec_id(data_dir):
    """Which codec made data_dir's codes, as a string. Two data dirs get the same string exactly
    when their token ids stand for the same sounds. The pretrained EnCodec is one codec everywhere;
    an offline one is fitted to its corpus, so it is named by a hash of its weights, which
    prepare.py --codec_from copies."""
    c = codec_record(data_dir)
    if c["pretrained"]:
        return f"{c['name']} (pretrained)"
    path = Path(data_dir) / c["weights"]
    stat = path.stat() if path.is_file() else None
    key = (str(path.resolve()), stat and (stat.st_mtime_ns, stat.st_size))
    if key not in _codec_ids:  # hashing ~60 MB takes ~0.1 s: once per file version
        state, digest = read_offline_codec(data_dir, c)["model"], hashlib.sha256()
        for k in sorted(state):
            digest.update(k.encode() + state[k].numpy().tobytes())
        _codec_ids[key] = f"{c['name']} {digest.hexdigest()[:16]}"
    return _codec_ids[key]

@torch.no_grad()
def encode_emb(model, wavs):
    """Batch of 1-D float arrays -> list of encoder outputs (frames, 128), frames = ceil(n / 320).
    EnCodec is causal, so the zeros after a shorter clip do not change its frames."""
    lens = [len(w) for w in wavs]
    # every clip is zero padded to whole frames, and to 7 frames at least: then no conv pads its
    # end by reflection, none is shorter than its kernel, and a clip's codes are the same alone or
    # in a batch
    x = torch.zeros(len(wavs), 1, max(7, n_frames(max(lens))) * HOP)
    for i, w in enumerate(wavs):
        x[i, 0, :len(w)] = torch.as_tensor(w)
    emb = model.encoder(x).transpose(1, 2)            # (B, T, 128)
    return [emb[i, :n_frames(n)] for i, n in enumerate(lens)]

@torch.no_grad()
def quantize(model, emb):
    """Encoder outputs (T, 128) -> codes (T, N_Q) int64."""
    codes = model.quantizer.encode(emb.T[None], model.frame_rate, BANDWIDTH)   # (n_q, 1, T)
    return codes[:, 0].T.long()

@torch.no_grad()
def decode(codec, codes):
    """codes (T, k) -> wav (T * 320,) float32 tensor at 24 kHz, decoded with the first k quantizers
    (EnCodec sums the residual codebooks it is given; k < 8 is a lower bitrate)."""
    codes = torch.as_tensor(codes).long().cpu().T[None]  # (1, k, T)
    with torch.autocast("cpu", enabled=False):  # the codec runs in float32 on the CPU
        return codec.decode([(codes, None)])[0, 0].float()

def features(wav, codec):
    """features(wav, codec) -> (codes, mel), frame i of each aligned, frames = ceil(n / 320).
    wav: a 1-D float array of n samples at 24 kHz. codec: from load_codec(). codes: int64 np array
    (frames, 8), EnCodec's at 6 kbps, column 0 the coarse stream. mel: float32 np array (frames,
    64), from log_mel()."""
    wav = np.asarray(wav, dtype=np.float32)
    emb = encode_emb(codec, [wav])[0]
    return quantize(codec, emb).numpy(), log_mel(wav)

class StreamingDecoder:
    """Decodes codes a few frames at a time with EnCodec's decoder. It returns the same audio as
    decoding the whole sequence at once, up to float rounding. The decoder is causal, so each layer
    needs only its own state: a conv's last (k - 1) * dilation inputs, a transposed conv's overlap
    tail, an LSTM's (h, c). Whisper-GPT's hybrid uses it to get the mel of each frame it generates
    at the cost of one frame of decoding. The first call (the prompt) should carry at least 7
    frames, as the first conv pads its start by reflection.

    Work that changes nothing is skipped, with the same result:
    - a residual branch whose last conv has zero weight and bias adds 0;
    - an LSTM whose cell-input gate has zero weights and biases outputs 0 (its cell stays 0);
    - a 1x1 conv whose weight is the identity matrix passes its input;
    - a 1x1 or upsampling conv whose weight is under 5% nonzero is a sparse product.
    The offline codec (codec.dct_init) has all of these, and so takes ~5x less time per frame than
    computing it all. A pretrained EnCodec has none of them."""

    def __init__(self, codec):
        self.codec, self.state, self.weights = codec, {}, {}
        self.zero, self.identity, self.sparse = {}, {}, {}      # what each part is, found once

    @torch.inference_mode()
    def __call__(self, codes):
        """codes (T, k): the next T frames of the first k codebooks -> their audio, (T * 320,)
        float32."""
        with torch.autocast("cpu", enabled=False):  # as decode()
            z = self.codec.quantizer.decode(torch.as_tensor(codes).long().T[:, None])  # (1, 128, T)
            return self._run(self.codec.decoder.model, z)[0, 0].float()

    def _run(self, module, x):
        if isinstance(module, SConv1d):
            return self._conv(module, x)
        if isinstance(module, SConvTranspose1d):
            return self._conv_transpose(module, x)
        if isinstance(module, SLSTM):
            return self._lstm(module, x)
        if isinstance(module, SEANetResnetBlock):
            return self._resnet_block(module, x)
        if isinstance(module, torch.nn.Sequential):
            return self._sequential(module, x)
        if isinstance(module, (torch.nn.ELU, torch.nn.Identity)):  # no state in time
            return module(x)
        raise TypeError(f"StreamingDecoder: no streaming rule for {type(module).__name__} in the "
                        f"codec's decoder")

    def _sequential(self, module, x):
        for m in module:
            x = self._run(m, x)
        return x

    def _resnet_block(self, module, x):
        if self._zero(module.block[-1].conv.conv):
            return self._run(module.shortcut, x)
        return self._run(module.shortcut, x) + self._run(module.block, x)

    def _zero(self, conv):
        """Whether a conv outputs exactly 0 for any input (its weight and bias are zero)."""
        if conv not in self.zero:
            self.zero[conv] = not self._weight(conv).any() and (conv.bias is None
                                                                 or not conv.bias.any())
        return self.zero[conv]

    def _weight(self, conv):
        """A conv's weight, computed once. EnCodec's weight norm (g * v / |v|, the norm over all but
        dim 0) would otherwise be recomputed at every call, which costs more than a frame's
        convolution."""
        if conv not in self.weights:
            if hasattr(conv, "weight_g"):
                w = conv.weight_g * conv.weight_v / conv.weight_v.norm(dim=(1, 2), keepdim=True)
            else:
                w = conv.weight
            self.weights[conv] = w.detach()
        return self.weights[conv]

    def _conv(self, module, x):
        conv = module.conv.conv
        assert conv.stride[0] == 1 and isinstance(module.conv.norm,
                                                  torch.nn.Identity), "stride 1, weight norm"
        pad = (conv.kernel_size[0] - 1) * conv.dilation[0]
        if pad:
            prev = self.state.get(module)
            if prev is None:
                x = encodec_pad1d(x, (pad, 0), module.pad_mode)
            else:
                x = torch.cat([prev, x], -1)
            self.state[module] = x[..., -pad:]
        if conv.kernel_size[0] == 1:  # a 1x1 conv (the residual shortcuts) is one matmul
            if self._identity(conv):
                return x
            y = self._matmul(x.transpose(1, 2), conv, self._weight(conv)[:, :, 0].T).transpose(1, 2)
            return y if conv.bias is None else y + conv.bias[:, None]
        return torch.nn.functional.conv1d(x, self._weight(conv), conv.bias, dilation=conv.dilation)

    def _identity(self, conv):
        """Whether a 1x1 conv outputs its input (its weight the identity matrix, its bias zero)."""
        if conv not in self.identity:
            w = self._weight(conv)[:, :, 0]
            self.identity[conv] = (w.shape[0] == w.shape[1]
                                   and torch.equal(w, torch.eye(w.shape[0], dtype=w.dtype))
                                   and (conv.bias is None or not conv.bias.any()))
        return self.identity[conv]

    def _matmul(self, x, conv, w):
        """x (B, n, C_in) @ w (C_in, m), w being conv's weight in matrix form. When under 5% of w is
        nonzero, as a sparse product: the same sums, ~10x faster for the offline codec's
        upsampling, which only moves samples (320 nonzero weights of 2.1M)."""
        if conv not in self.sparse:
            self.sparse[conv] = w.T.to_sparse() if w.count_nonzero() < 0.05 * w.numel() else None
        if self.sparse[conv] is None:
            return x @ w
        B, n, _ = x.shape
        return torch.sparse.mm(self.sparse[conv], x.reshape(B * n, -1).T).T.reshape(B, n, -1)

    def _conv_transpose(self, module, x):
        convtr = module.convtr.convtr
        assert isinstance(module.convtr.norm, torch.nn.Identity), "weight norm"
        k, stride = convtr.kernel_size[0], convtr.stride[0]
        prev = self.state.get(module)                    # the overlap tail of the last call
        if k == 2 * stride:
            # EnCodec's upsampling: one matmul, then each input's first `stride` outputs plus the
            # previous input's last ones; much faster than the generic kernel on a frame or two
            B, _, n = x.shape
            cols = self._matmul(x.transpose(1, 2), convtr, self._weight(convtr).flatten(1))
            cols = cols.view(B, n, -1, k)                # (B, n, C_out, k)
            if prev is None:
                prev = cols.new_zeros(B, 1, cols.shape[2], stride)
            tails = prev if n == 1 else torch.cat([prev, cols[:, :-1, :, stride:]], 1)
            y = (cols[..., :stride] + tails).permute(0, 2, 1, 3).flatten(2)
            self.state[module] = cols[:, -1:, :, stride:]
        else:
            y = torch.nn.functional.conv_transpose1d(x, self._weight(convtr), None, stride=stride)
            # y: (.., n * stride + k - stride); its tail overlaps what follows
            if prev is not None:
                y[..., :k - stride] += prev
            n = x.shape[-1] * stride
            self.state[module] = y[..., n:]
            y = y[..., :n]
        return y if convtr.bias is None else y + convtr.bias[:, None]

    def _lstm(self, module, x):
        if module not in self.zero:  # the cell-input gate g (rows 2h..3h of i, f, g, o) all zero
            lstm, h = module.lstm, module.lstm.hidden_size
            self.zero[module] = not any(p[2 * h:3 * h].any() for p in lstm.parameters())
        if self.zero[module]:
            return x if module.skip else torch.zeros_like(x)
        x = x.permute(2, 0, 1)                           # (T, B, C)
        state = self.state.get(module)
        if state is None or len(x) > 8:
            y, self.state[module] = module.lstm(x, state)
        else:
            # a few steps: the cell by hand, ~10x faster than the fused kernel's cost per call
            lstm, (h, c), y = module.lstm, state, x
            for layer in range(lstm.num_layers):
                w_ih = getattr(lstm, f"weight_ih_l{layer}")
                w_hh = getattr(lstm, f"weight_hh_l{layer}")
                b = getattr(lstm, f"bias_ih_l{layer}") + getattr(lstm, f"bias_hh_l{layer}")
                hl, cl, out = h[layer], c[layer], []
                for xt in y:
                    i, f, g, o = (xt @ w_ih.T + hl @ w_hh.T + b).chunk(4, -1)
                    cl = torch.sigmoid(f) * cl + torch.sigmoid(i) * torch.tanh(g)
                    hl = torch.sigmoid(o) * torch.tanh(cl)
                    out.append(hl)
                y = torch.stack(out)
                h = torch.cat([h[:layer], hl[None], h[layer + 1:]])
                c = torch.cat([c[:layer], cl[None], c[layer + 1:]])
            self.state[module] = (h, c)
        return (y + x if module.skip else y).permute(1, 2, 0)

