"""
Prepare audio + text data for the three models: 24 kHz audio -> EnCodec codes and an aligned log-mel
spectrogram (one mel frame per codec frame), plus captions / transcripts / labels / QA as text.

    python prepare.py                                   # built-in offline corpus -> data/synth/
    python prepare.py --clips=3000                      # a bigger one
    python prepare.py --dataset=librispeech --src=LibriSpeech/dev-clean --name=libri
    python prepare.py --dataset=folder --src=my_wavs --name=mine     # optional manifest.csv / manifest.jsonl

The codec is the pretrained EnCodec 24 kHz (--codec_dir, the torch hub cache, or a download), else an offline one
with its architecture, trained here on the corpus (--offline skips the download; see train_codec).

Output in data/<name>/ (see README): meta.json, {split}_codes.bin (uint16 [frames, n_q]),
{split}_mel.bin (float16 [frames, n_mels]), {split}_clips.jsonl, plus the corpus BPE (tokenizer.tiktoken) and, for the
offline codec, codec.pt and codec.png. Read with np.memmap(path, dtype, mode="r").reshape(-1, n_q or n_mels).
With --whisper_mel, also {split}_wmel.bin (float16 [frames, 80]): OpenAI Whisper's own log-mel (16 kHz, 100 frames/s,
see whisper_log_mel), each clip's at its "woffset" / "wframes" in {split}_clips.jsonl. With --codebook0_mel (also on
a finished directory: made from its codes), {split}_mel_c0.bin: the log-mel of codebook 0 decoded alone.

Other scripts use: load_codec(data_dir), load_audio(path), resample(wav, sr_in, sr_out), log_mel(wav),
whisper_log_mel(wav), features(wav, codec), StreamingDecoder(codec), plot_mels(path, panels). The tokenizers are in
tokenizer.py (prepare.py trains the corpus BPE with it).
"""
import os
import sys
import re
import csv
import json
import math
import time
import types
import shutil
import hashlib
import itertools
import argparse
import ctypes
import warnings
from pathlib import Path
from collections import Counter

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
from encodec.modules.conv import pad1d as encodec_pad1d  # noqa: E402
from tokenizer import CORPUS_BPE_FILE, PROMPT_TEXT, save_ranks, train_bpe, EOT  # noqa: E402
from synth import DTMF_HIGH, DTMF_KEYS, DTMF_LOW, MORSE, make_dtmf, make_morse, make_music, midi_name, speech_problem, synth_clip  # noqa: E402

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

# OpenAI Whisper's own input features (optional --whisper_mel stream), so a real Whisper encoder sees what it was
# trained on: aligned with the clip, not with the codec frames (frame i is centred on 16 kHz sample 160*i, at i/100 s)
WHISPER_SR, WHISPER_N_FFT, WHISPER_HOP, WHISPER_N_MELS = 16000, 400, 160, 80
WHISPER_FRAME_RATE = WHISPER_SR // WHISPER_HOP     # 100 frames/s

def whisper_mel_filters():
    """The 80-bin Slaney filters openai-whisper ships (whisper/assets/mel_filters.npz, key "mel_80"), (80, 201).
    Found without importing whisper (its __init__ imports numba): pip install --no-deps openai-whisper is enough."""
    if "wfb" not in _mel_cache:
        import importlib.util
        spec = importlib.util.find_spec("whisper")
        if spec is None or not spec.submodule_search_locations:   # not installed, or an unrelated module "whisper"
            raise FileNotFoundError("whisper mel: openai-whisper is not installed, so its whisper/assets/mel_filters.npz "
                                    "cannot be found (pip install --no-deps openai-whisper)")
        path = Path(list(spec.submodule_search_locations)[0]) / "assets" / "mel_filters.npz"
        if not path.is_file():
            raise FileNotFoundError(f"whisper mel: {path} not found (pip install --no-deps openai-whisper)")
        with np.load(path, allow_pickle=False) as f:
            _mel_cache["wfb"] = torch.from_numpy(f[f"mel_{WHISPER_N_MELS}"].astype(np.float32))
    return _mel_cache["wfb"]

def whisper_log_mel(wav, sr=SAMPLE_RATE):
    """Whisper's log-mel (as whisper.audio.log_mel_spectrogram) of a 1-D clip at sr (24 kHz by default; resampled
    to 16 kHz here) -> (frames, 80) float32, frames = n16k // 160 (about 100 per second). One difference: Whisper
    takes the max for its 8-decade floor over its whole (30 s, zero padded) input; here it is over the clip itself."""
    x = np.asarray(wav, dtype=np.float32)
    if sr != WHISPER_SR:
        x = resample(x, sr, WHISPER_SR)
    x = torch.from_numpy(x)
    win = torch.hann_window(WHISPER_N_FFT)            # periodic, as Whisper's
    stft = torch.stft(x, WHISPER_N_FFT, WHISPER_HOP, window=win, center=True, pad_mode="reflect", return_complex=True)
    power = stft[..., :-1].abs() ** 2                 # Whisper drops the last frame
    mel = whisper_mel_filters() @ power               # (80, frames)
    out = torch.clamp(mel, min=1e-10).log10()
    out = torch.maximum(out, out.max() - 8.0)
    return ((out + 4.0) / 4.0).T.contiguous().numpy()

# -----------------------------------------------------------------------------
# the codec: pretrained EnCodec 24 kHz whenever its weights can be had, else an offline one trained on the corpus

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
    model = EncodecModel.encodec_model_24khz(pretrained=True, repository=Path(weights_dir))   # checks the file's hash
    model.set_target_bandwidth(BANDWIDTH)
    return model.eval()

def download_codec():
    """EnCodec 24 kHz through encodec's own loader: torch.hub downloads (and hash-checks) it into the hub cache."""
    warnings.filterwarnings("ignore", message=".*weight_norm.*deprecated")
    model = EncodecModel.encodec_model_24khz(pretrained=True)
    model.set_target_bandwidth(BANDWIDTH)
    return model.eval()

def get_pretrained_codec(codec_dir=None, offline=False, strict=False):
    """The pretrained EnCodec 24 kHz and its weights file, from --codec_dir, else the torch hub cache, else a download
    (skipped when offline); (None, None) when none can be had: the caller then trains the offline codec. Each
    failure is one line naming the file or the cause (with strict, an error)."""
    def failed(msg):
        if strict:
            sys.exit(f"error: {msg} (--strict)")
        print(f"codec: {msg}")
    weights_dir = find_codec_weights(codec_dir)
    if weights_dir:
        try:
            return pretrained_codec(weights_dir), weights_dir / CODEC_FILE
        except Exception as e:                       # a truncated or corrupt file: wrong hash, unreadable
            failed(f"{weights_dir / CODEC_FILE}: unusable ({type(e).__name__}: {str(e).strip()[:120]}); "
                   "delete it to download it again")
            return None, None
    if offline:
        return None, None
    t0 = time.time()
    try:
        return download_codec(), Path(torch.hub.get_dir()) / "checkpoints" / CODEC_FILE
    except Exception as e:
        failed(f"downloading EnCodec's weights failed after {time.time() - t0:.1f}s "
               f"({type(e).__name__}: {str(e).strip()[:120]})")
        return None, None

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
    """Standardise the encoder's output per channel on this corpus, for k-means: an untrained encoder's outputs sit
    in a tiny cloud far from zero (spread ~1e-3 around an offset of ~3e-2), where float rounding alone flips
    nearest-codeword choices. A Standardize is appended to the encoder and its inverse folded into the decoder's
    first conv (a constant offset survives the reflect padding, so that is exact). emb (N, 128): outputs of the
    encoder as it was; returns them standardised by the very same op, so stored codes equal what the calibrated
    encoder gives."""
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

# --- the offline codec's training: EnCodec's reconstruction objective on the corpus's own audio

_stft_mel = {}

def multiscale_mel_loss(x, y):
    """EnCodec's frequency-domain loss over STFT windows of 2^6 .. 2^11 samples (EnCodec: 2^5 .. 2^11), hop a quarter
    window, mel filters (64, fewer for the short windows), magnitudes scaled so a full-scale sine reads ~1: L1 on
    the mel magnitudes plus L1 on their logs (EnCodec: L1 + L2 on magnitudes; the log term makes the quiet parts
    count, and much of this audio is quiet). x, y: (B, n)."""
    loss = 0.0
    for i in range(6, 12):
        n = 2 ** i
        if n not in _stft_mel:
            _stft_mel[n] = (torch.hann_window(n), torch.from_numpy(mel_filterbank(min(N_MELS, n // 8), n)))
        win, fb = _stft_mel[n]
        mags = [fb @ torch.stft(z, n, n // 4, window=win, return_complex=True).abs() * (4.0 / n) for z in (x, y)]
        loss = loss + (mags[0] - mags[1]).abs().mean() + \
            (torch.log(mags[0] + 1e-3) - torch.log(mags[1] + 1e-3)).abs().mean()
    return loss / 6

def codec_loss(x, y):
    """EnCodec's reconstruction loss, weights as in the paper: 0.1 x time-domain L1 + 1 x multi-scale mel."""
    return 0.1 * (x - y).abs().mean() + multiscale_mel_loss(x, y)

def random_crops(wavs, n, batch, rng):
    """batch crops of n samples (whole frames) from random clips, zero padded at a clip's end, with some sound in
    them where the clips have any (silence teaches little). Returns (batch, n) float32 and the crops' first frames."""
    xs, where, tries = [], [], 0
    while len(xs) < batch:
        i = int(rng.integers(len(wavs)))
        w = wavs[i]
        f = int(rng.integers(0, max(1, n_frames(len(w)) - n // HOP + 1)))
        x = np.zeros(n, np.float32)
        seg = w[f * HOP:f * HOP + n]
        x[:len(seg)] = seg
        tries += 1
        if np.abs(x).max() > 0.02 or tries > 20 * batch:
            xs.append(x); where.append((i, f))
    return torch.from_numpy(np.stack(xs)), where

@torch.no_grad()
def unit_variance_init(net, x, last_std=1.0):
    """Layer-sequential unit-variance init (LSUV, Mishkin & Matas 2016) of a SEANet encoder or decoder: with
    PyTorch's default init every conv shrinks its input's variance ~3x, so after EnCodec's ~20 convs a random
    network's output no longer depends on its input (the untrained decoder plays one fixed buzz whatever it is
    given) and gradients vanish. Zero the biases, then in forward order rescale each conv's weight-norm gain so
    that its output on x has unit std (the last one: last_std). The architecture is untouched."""
    convs = [m for m in net.modules() if hasattr(m, "weight_g")]
    for m in convs:
        m.bias.zero_()
    for i, m in enumerate(convs):
        seen = []
        hook = m.register_forward_hook(lambda mod, inp, out: seen.append(out.std()))
        net(x)
        hook.remove()
        m.weight_g.mul_((last_std if i == len(convs) - 1 else 1.0) / seen[0].clamp_min(1e-12))
    return net

def codec_step(opt, params, loss):
    """One optimiser step of the codec's training, gradient norm clipped at 1."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()

def train_codec(model, wavs, steps, batch=4, crop_seconds=0.3, lr=1e-3, ckpt=None, quiet=False, save_every=25):
    """Train the offline codec's encoder and decoder as an autoencoder on 24 kHz clips (EnCodec's reconstruction
    loss; its codebooks are fitted afterwards by k-means, see fit_codebooks). Resumable: every save_every steps the
    model, the optimiser and the step go to ckpt (written to a temporary file, then renamed), and each step's crops
    are drawn from a seed of its own, so a resumed run ends with the weights of an uninterrupted one."""
    params = list(model.encoder.parameters()) + list(model.decoder.parameters())
    opt = torch.optim.Adam(params, lr, betas=(0.5, 0.9))
    # a short warmup, then cosine down to a tenth: the few steps a CPU budget allows end on a settled model
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / 20, 0.55 + 0.45 * math.cos(math.pi * min(1.0, s / max(1, steps)))))
    step = 0
    if not isinstance(model.encoder.model[-1], Standardize):
        model.encoder.model.append(Standardize())
    if ckpt and Path(ckpt).exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"]); opt.load_state_dict(state["opt"]); sched.load_state_dict(state["sched"])
        step = state["step"]
    else:                                             # a fresh start: signal must get through both halves
        x, _ = random_crops(wavs, int(0.4 * SAMPLE_RATE) // HOP * HOP, 8, np.random.default_rng(3))
        unit_variance_init(model.encoder, x[:, None])
        with torch.no_grad():                         # the encoder's output standardised: unit scale for the decoder
            e = torch.cat(encode_emb(model, wavs[:64]))
        model.encoder.model[-1].mean.copy_(e.mean(0))
        model.encoder.model[-1].std.copy_(e.std(0).clamp_min(1e-8))
        unit_variance_init(model.decoder, model.encoder(x[:, None]), last_std=float(x.std()))
    n = int(crop_seconds * SAMPLE_RATE) // HOP * HOP
    model.train()
    pbar = tqdm(total=steps, initial=step, unit="step", desc="train codec", disable=quiet)
    while step < steps:
        x, _ = random_crops(wavs, n, batch, np.random.default_rng([step, 7]))
        y = model.decoder(model.encoder(x[:, None]))[:, 0, :n]
        loss = codec_loss(x, y)
        codec_step(opt, params, loss)
        sched.step()
        step += 1
        pbar.update(1)
        pbar.set_postfix(loss=f"{loss.item():.3f}")
        if ckpt and (step % save_every == 0 or step == steps):
            tmp = Path(f"{ckpt}.tmp")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "step": step}, tmp)
            os.replace(tmp, ckpt)
    pbar.close()
    return model.eval()

def tune_decoder(model, wavs, embs, steps, batch=4, crop_seconds=0.4, lr=3e-4, quiet=False):
    """After the codebooks are fitted, the decoder alone learns from what it will be given: quantized encoder
    outputs. Each crop keeps the first 1, 2, 4 or all 8 codebooks (EnCodec samples its bandwidth per batch the same
    way), so decoding codebook 0 alone, as Whisper-GPT's samples are, gives audio too. wavs and embs
    (standardised encoder outputs, (frames, 128)) are paired clip by clip."""
    levels = [1, 2, 4, N_Q]
    with torch.no_grad():
        codes = [quantize(model, e).T[:, None] for e in embs]                  # (n_q, 1, frames)
        qs = [[model.quantizer.decode(c[:k])[0] for k in levels] for c in codes]   # (128, frames) per level
    opt = torch.optim.Adam(model.decoder.parameters(), lr, betas=(0.5, 0.9))
    rng = np.random.default_rng(11)
    frames = int(crop_seconds * FRAME_RATE)
    model.train()
    for _ in tqdm(range(steps), unit="step", desc="tune decoder", disable=quiet):
        x, where = random_crops(wavs, frames * HOP, batch, rng)
        z = torch.zeros(batch, qs[0][0].shape[0], frames)
        for b, (i, f) in enumerate(where):
            q = qs[i][int(rng.integers(len(levels)))][:, f:f + frames]
            z[b, :, :q.shape[-1]] = q
        y = model.decoder(z)[:, 0, :x.shape[-1]]
        codec_step(opt, list(model.decoder.parameters()), codec_loss(x, y))
    return model.eval()

@torch.no_grad()
def reconstruct(model, wavs, quantized=True):
    """decode(encode(x)) for each 1-D clip in wavs, through the codes at 6 kbps (or, quantized=False, straight from
    the encoder's output), each trimmed to its input's length. Batched: EnCodec is causal, so zeros after a
    shorter clip change nothing in it."""
    embs = encode_emb(model, wavs)
    T = max(len(e) for e in embs)
    z = torch.zeros(len(wavs), embs[0].shape[1], T)
    for i, e in enumerate(embs):
        z[i, :, :len(e)] = model.quantizer.decode(quantize(model, e).T[:, None])[0] if quantized else e.T
    y = model.decoder(z)[:, 0]
    return [y[i, :len(w)].numpy() for i, w in enumerate(wavs)]

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
    n_std = sum(1 for k in ckpt["model"] if re.fullmatch(r"encoder\.model\.\d+\.std", k))
    for _ in range(n_std):                           # one before training, one for k-means (see calibrate)
        model.encoder.model.append(Standardize())
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    if unexpected or any(not (k.endswith("embed_avg") or k.startswith("quantizer.vq.layers.")) for k in missing):
        raise ValueError(f"{Path(data_dir) / c['weights']}: does not match this prepare.py's offline codec "
                         f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}): re-run prepare.py --force")
    return model.eval()

def codebook0_mels(data_dir, quiet=False):
    """{split}_mel_c0.bin (float16 [frames, n_mels], aligned with the codes): the log-mel of each clip's codebook 0
    decoded alone by the data's codec. That is what Whisper-GPT's hybrid computes from its own output while it
    generates (only codebook 0 is generated), so a hybrid trained on it (mel_source="codebook0") is trained on what
    it will see. Made from the stored codes; a split whose file exists is skipped."""
    data_dir = Path(data_dir)
    meta = json.loads((data_dir / "meta.json").read_text())
    codec = None
    for split in ("train", "val"):
        path = data_dir / f"{split}_mel_c0.bin"
        if path.exists():
            continue
        codec = codec or load_codec(data_dir)
        clips = [json.loads(line) for line in open(data_dir / f"{split}_clips.jsonl") if line.strip()]
        codes = np.memmap(data_dir / f"{split}_codes.bin", dtype=np.uint16, mode="r").reshape(-1, meta["n_q"])
        mel = np.zeros((len(codes), meta["n_mels"]), np.float16)
        for c in tqdm(clips, unit="clip", desc=f"codebook-0 mel, {split}", disable=quiet):
            z = torch.from_numpy(codes[c["offset"]:c["offset"] + c["frames"], :1].astype(np.int64)).T[None]   # (1, 1, T)
            with torch.no_grad():
                wav = codec.decode([(z, None)])[0, 0].numpy()
            mel[c["offset"]:c["offset"] + c["frames"]] = log_mel(wav)[:c["frames"]]
        tmp = Path(f"{path}.tmp{os.getpid()}")
        mel.tofile(tmp)
        os.replace(tmp, path)

class StreamingDecoder:
    """Decodes codes a few frames at a time with EnCodec's decoder and returns the same audio as decoding the whole
    sequence at once (up to float rounding): the decoder is causal, so each layer only needs its own state: the last
    (k - 1) * dilation inputs of a conv, the overlap tail of a transposed conv, the LSTM's (h, c). Whisper-GPT's
    hybrid uses it to get the mel of each frame it generates at the cost of one frame of decoding.
    The first call should carry at least 7 frames (the prompt): the first conv pads its start by reflection."""

    def __init__(self, codec):
        from encodec.modules.conv import SConv1d, SConvTranspose1d
        from encodec.modules.lstm import SLSTM
        from encodec.modules.seanet import SEANetResnetBlock
        self.codec, self.state, self.weights = codec, {}, {}
        self.kinds = {SConv1d: self._conv, SConvTranspose1d: self._conv_transpose, SLSTM: self._lstm,
                      SEANetResnetBlock: self._resnet_block, torch.nn.Sequential: self._sequential}

    @torch.no_grad()
    def __call__(self, codes):
        """codes (T, k): the next T frames of the first k codebooks -> their audio, (T * 320,) float32."""
        z = self.codec.quantizer.decode(torch.as_tensor(codes).long().T[:, None])   # (1, 128, T)
        return self._run(self.codec.decoder.model, z)[0, 0].float()

    def _run(self, module, x):
        step = self.kinds.get(type(module))
        if step:
            return step(module, x)
        if isinstance(module, (torch.nn.ELU, torch.nn.Identity)):                  # no state in time
            return module(x)
        raise TypeError(f"StreamingDecoder: no streaming rule for {type(module).__name__} in the codec's decoder")

    def _sequential(self, module, x):
        for m in module:
            x = self._run(m, x)
        return x

    def _resnet_block(self, module, x):
        return self._run(module.shortcut, x) + self._run(module.block, x)

    def _weight(self, conv):
        """A conv's weight, computed once: EnCodec's weight norm (g * v / |v|, norm over all but dim 0) would
        otherwise be recomputed at every call, which costs more than a frame's convolution."""
        if conv not in self.weights:
            w = conv.weight_g * conv.weight_v / conv.weight_v.norm(dim=(1, 2), keepdim=True) if hasattr(conv, "weight_g") else conv.weight
            self.weights[conv] = w.detach()
        return self.weights[conv]

    def _conv(self, module, x):
        conv = module.conv.conv
        assert conv.stride[0] == 1 and isinstance(module.conv.norm, torch.nn.Identity), "stride 1, weight norm"
        pad = (conv.kernel_size[0] - 1) * conv.dilation[0]
        if pad:
            prev = self.state.get(module)
            x = encodec_pad1d(x, (pad, 0), module.pad_mode) if prev is None else torch.cat([prev, x], -1)
            self.state[module] = x[..., -pad:]
        return torch.nn.functional.conv1d(x, self._weight(conv), conv.bias, dilation=conv.dilation)

    def _conv_transpose(self, module, x):
        convtr = module.convtr.convtr
        assert isinstance(module.convtr.norm, torch.nn.Identity), "weight norm"
        k, stride = convtr.kernel_size[0], convtr.stride[0]
        if k == 2 * stride:                              # EnCodec's upsampling: one matmul and two shifted adds, much
            B, _, n = x.shape                            # faster than the generic kernel on a frame or two
            w = self._weight(convtr)                     # (C_in, C_out, k)
            cols = (x.transpose(1, 2) @ w.flatten(1)).view(B, n, -1, k).permute(0, 2, 1, 3)   # (B, C_out, n, k)
            y = x.new_zeros(B, cols.shape[1], (n + 1) * stride)
            y[..., :n * stride] += cols[..., :stride].flatten(2)
            y[..., stride:] += cols[..., stride:].flatten(2)
        else:
            y = torch.nn.functional.conv_transpose1d(x, self._weight(convtr), None, stride=stride)
        prev = self.state.get(module)                    # y: (.., n * stride + k - stride); its tail overlaps what follows
        if prev is not None:
            y[..., :k - stride] += prev
        n = x.shape[-1] * stride
        self.state[module] = y[..., n:]
        y = y[..., :n]
        return y if convtr.bias is None else y + convtr.bias[:, None]

    def _lstm(self, module, x):
        x = x.permute(2, 0, 1)                           # (T, B, C)
        state = self.state.get(module)
        if state is None or len(x) > 8:
            y, self.state[module] = module.lstm(x, state)
        else:                                            # a few steps: the cell by hand, ~10x faster than the fused
            lstm, (h, c), y = module.lstm, state, x      # kernel's per-call cost for one step
            for layer in range(lstm.num_layers):
                w_ih, w_hh = getattr(lstm, f"weight_ih_l{layer}"), getattr(lstm, f"weight_hh_l{layer}")
                b = getattr(lstm, f"bias_ih_l{layer}") + getattr(lstm, f"bias_hh_l{layer}")
                hl, cl, out = h[layer], c[layer], []
                for xt in y:
                    i, f, g, o = (xt @ w_ih.T + hl @ w_hh.T + b).chunk(4, -1)
                    cl = torch.sigmoid(f) * cl + torch.sigmoid(i) * torch.tanh(g)
                    hl = torch.sigmoid(o) * torch.tanh(cl)
                    out.append(hl)
                y, h, c = torch.stack(out), torch.cat([h[:layer], hl[None], h[layer + 1:]]), torch.cat([c[:layer], cl[None], c[layer + 1:]])
            self.state[module] = (h, c)
        return (y + x if module.skip else y).permute(1, 2, 0)

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

# --- reading the corpus's labels back from audio: the offline codec's report, and the tests, use these

def envelope_runs(x, win=0.005, rel=0.3):
    """On/off runs of a signal's RMS envelope: a list of (on, start, end) in samples."""
    w = max(1, int(win * SAMPLE_RATE))
    env = np.sqrt(np.convolve(np.asarray(x, np.float64) ** 2, np.ones(w) / w, "same"))
    on = env > rel * env.max()
    edges = np.concatenate([[0], np.flatnonzero(np.diff(on.astype(int))) + 1, [len(on)]])
    return [(bool(on[a]), int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]

def read_morse(x):
    """The word a morse clip spells (dots and dashes from the envelope; '?' for a symbol that is no letter)."""
    runs = [(on, (b - a) / SAMPLE_RATE) for on, a, b in envelope_runs(x, win=0.002)]
    while runs and not runs[0][0]:
        runs.pop(0)
    while runs and not runs[-1][0]:
        runs.pop()
    if not runs:
        return ""
    unit = min(d for on, d in runs if on)
    letters = {v: k for k, v in MORSE.items()}
    word, sym = "", ""
    for on, d in runs:
        if on:
            sym += "." if d < 2 * unit else "-"
        elif d > 2 * unit:                            # a gap between letters
            word, sym = word + letters.get(sym, "?"), ""
    return word + letters.get(sym, "?")

def goertzel_power(x, hz):
    t = np.arange(len(x)) / SAMPLE_RATE
    return np.abs(np.sum(x * np.exp(-2j * np.pi * hz * t))) ** 2

def read_dtmf(x):
    """The keys a DTMF clip dials: the strongest low and high tone of each burst."""
    lows, highs = sorted(set(DTMF_LOW.values())), sorted(set(DTMF_HIGH.values()))
    keys = {(DTMF_LOW[k], DTMF_HIGH[k]): k for k in DTMF_KEYS}
    digits = ""
    for on, a, b in envelope_runs(x):
        if on:
            seg = np.asarray(x[a:b], np.float64)
            digits += keys[(max(lows, key=lambda f: goertzel_power(seg, f)), max(highs, key=lambda f: goertzel_power(seg, f)))]
    return digits

def read_pitch(x, fmin=60.0, fmax=1200.0, threshold=0.15):
    """Fundamental frequency in Hz by YIN (de Cheveigne & Kawahara 2002): the first dip of the cumulative-mean-
    normalised difference function, refined by parabolic interpolation."""
    x = np.asarray(x, np.float64)
    taus = np.arange(1, int(SAMPLE_RATE / fmin))
    n = len(x) - taus[-1]
    d = np.array([np.sum((x[:n] - x[t:t + n]) ** 2) for t in taus])
    dn = d * taus / np.maximum(np.cumsum(d), 1e-12)
    lo = int(SAMPLE_RATE / fmax)
    cand = np.flatnonzero(dn[lo:] < threshold)
    i = lo + (cand[0] if len(cand) else int(np.argmin(dn[lo:])))
    while i + 1 < len(dn) and dn[i + 1] < dn[i]:
        i += 1
    a, b, c = dn[i - 1], dn[i], dn[i + 1]
    return SAMPLE_RATE / (taus[i] + 0.5 * (a - c) / (a - 2 * b + c))

def read_note(x):
    """The note name (e.g. 'A4') nearest to a clip's pitch, read just after its attack."""
    f = read_pitch(x[2000:SAMPLE_RATE // 2])
    return midi_name(int(round(69 + 12 * np.log2(max(f, 1.0) / 440))))

def codec_probes(seed, n_notes=30, n_morse=20, n_dtmf=20, n_any=12, max_dur=3.0):
    """Held-out clips for the codec's report, drawn with seeds the corpus never uses: single notes of the
    harmonic instruments (sine, square, sawtooth, plucked string), morse words, DTMF digits, and clips of every kind."""
    probes, i = {"note": [], "morse": [], "dtmf": [], "any": []}, 0
    want = {"note": n_notes, "morse": n_morse, "dtmf": n_dtmf}
    while any(len(probes[k]) < n for k, n in want.items()):
        rng = np.random.default_rng([seed, 1 << 30, i])
        i += 1
        kind = ["note", "morse", "dtmf"][i % 3]
        if len(probes[kind]) >= want[kind]:
            continue
        wav, info = {"note": make_music, "morse": make_morse, "dtmf": make_dtmf}[kind](rng, max_dur)
        if kind == "note" and (info["labels"]["form"] != "note" or info["labels"]["instrument"] == "bell"):
            continue
        probes[kind].append((wav, info))
    probes["any"] = [synth_clip(seed + 1, j, max_dur, speech=speech) for j, speech in
                     zip(range(n_any), [True, False] * n_any)]                  # seed + 1: not the corpus's clips
    return probes

def codec_report(model, probes, untrained=None):
    """How well decode(encode(x)) keeps what the corpus's labels say: the fraction of notes whose pitch reads as the
    labelled note (within a semitone), of morse words and DTMF digit strings read back exactly, and the log-mel L1
    between input and reconstruction, also for the untrained decoder when given (fed the unquantized encoder output).
    Returns the figures and the reconstructions ({kind: [audio]}, in the order of probes)."""
    rec = {k: reconstruct(model, [w for w, _ in v]) for k, v in probes.items()}
    mel_l1 = lambda ys: float(np.mean([np.abs(log_mel(y) - log_mel(w)).mean() for y, (w, _) in zip(ys, probes["any"])]))
    r = {"notes": float(np.mean([read_note(y) == info["labels"]["pitch"] for y, (_, info) in zip(rec["note"], probes["note"])])),
         "morse": float(np.mean([read_morse(y) == info["transcript"] for y, (_, info) in zip(rec["morse"], probes["morse"])])),
         "dtmf": float(np.mean([read_dtmf(y) == info["labels"]["digits"] for y, (_, info) in zip(rec["dtmf"], probes["dtmf"])])),
         "mel_l1": mel_l1(rec["any"])}
    if untrained is not None:
        r["mel_l1_untrained"] = mel_l1(reconstruct(untrained, [w for w, _ in probes["any"]], quantized=False))
    r["clips"] = {k: len(v) for k, v in probes.items()}
    return r, rec

def plot_mels(path, panels, title=None, boundary=None):
    """A PNG of log-mels (frames, n_mels) stacked one above the other: panels is a list of (name, mel). boundary,
    in seconds, draws a line (where a prompt ends and the continuation starts). Written atomically."""
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
    p.add_argument("--no_speech", action="store_true", help="synth: leave out the spoken sentences (a quarter of the corpus)")
    p.add_argument("--val_percent", type=float, default=10.0, help="percent of clips in the val split")
    p.add_argument("--codec_dir", default=None, help=f"directory with the pretrained {CODEC_FILE} (else hub cache, else offline)")
    p.add_argument("--offline", action="store_true", help="no download attempts (EnCodec's weights): local files or the offline codec")
    p.add_argument("--offline_codec", action="store_true", help="train the offline codec even if pretrained weights exist")
    p.add_argument("--codec_steps", type=int, default=450, help="offline codec: training steps (batches of 4 x 0.3 s)")
    p.add_argument("--codec_clips", type=int, default=400, help="offline codec: train-split clips it learns from")
    p.add_argument("--codec_tune_steps", type=int, default=150, help="offline codec: decoder steps on the fitted codes")
    p.add_argument("--codec_report", type=int, default=1, help="offline codec on synth: measure it on held-out clips (0: skip)")
    p.add_argument("--kmeans_frames", type=int, default=16384, help="offline codec: encoder frames used to fit the codebooks")
    p.add_argument("--kmeans_iters", type=int, default=12, help="offline codec: k-means iterations per codebook")
    p.add_argument("--vocab_size", type=int, default=4096, help="corpus BPE: largest vocab (the bytes + merges)")
    p.add_argument("--whisper_mel", action="store_true",
                   help="also store OpenAI Whisper's input features ({split}_wmel.bin: 80 bins, 16 kHz, 100 frames/s)")
    p.add_argument("--codebook0_mel", action="store_true",
                   help="also store {split}_mel_c0.bin, the log-mel of codebook 0 decoded alone (Whisper-GPT's mel_source=codebook0)")
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
    if not os.environ.get("OMP_NUM_THREADS"):         # side-by-side jobs set 1: oversubscribed threads crawl
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
    if args.dataset == "synth" and not args.no_speech and (problem := speech_problem()):
        if args.strict:
            sys.exit(f"error: speech: {problem} (--strict)")
        print(f"speech: {problem}; building the corpus without speech")
        args.no_speech = True                         # part of the arguments' hash: a later run with speech rebuilds
    # a re-run with the same arguments skips finished work
    key_args = {k: v for k, v in vars(args).items() if k not in ("force", "quiet", "strict", "codebook0_mel")}
    if not args.whisper_mel:                          # off: the hash of outputs made before the option existed
        del key_args["whisper_mel"]
    args_hash = hashlib.md5(json.dumps(key_args, sort_keys=True).encode()).hexdigest()[:12]
    meta_path = out / "meta.json"
    if meta_path.exists() and not args.force:
        meta = json.loads(meta_path.read_text())
        if meta.get("args_hash") == args_hash:
            print(f"{out} is already prepared with these arguments (use --force to rebuild)")
            if args.codebook0_mel:                    # made from the stored codes: no rebuild needed
                codebook0_mels(out, args.quiet)
            return out
        print(f"{out} holds data prepared with other arguments: rebuilding (the old files stay until the new ones are complete)")
    if args.whisper_mel:
        try:                                          # fail now, not after the codec has trained
            whisper_mel_filters()
        except FileNotFoundError as e:
            sys.exit(f"error: --whisper_mel: {e}")

    # --- problems with the input: one line each, counted, summarised at the end
    problems = Counter()
    muted = []                                        # set while the offline codec reads clips ahead of pass 1
    def report(what, problem):
        if muted:
            return
        if args.strict:
            sys.exit(f"error: {what}: {problem} (--strict)")
        problems[problem.split(" (")[0].split(":")[0]] += 1
        tqdm.write(f"skipping {what}: {problem}")

    # --- the codec: pretrained EnCodec whenever it can be had, else one trained here (after the clips are defined)
    codec, weights = (None, None) if args.offline_codec else \
        get_pretrained_codec(args.codec_dir, offline=args.offline, strict=args.strict)
    if codec is not None:
        codec_info = {"name": "encodec_24khz", "pretrained": True, "weights": str(weights.resolve()), "bandwidth": BANDWIDTH}
        print(f"codec: pretrained EnCodec 24 kHz from {weights}")
    else:
        codec = offline_codec()
        codec_info = {"name": "encodec_24khz-offline", "pretrained": False, "weights": "codec.pt", "bandwidth": BANDWIDTH,
                      "note": "OFFLINE codec: EnCodec 24 kHz architecture trained here on this corpus's audio with "
                              "EnCodec's reconstruction loss (no adversary); codebooks fitted by k-means; not the "
                              "pretrained EnCodec, whose codes these are not"}
        print(f"codec: OFFLINE EnCodec (pretrained weights not found{'' if args.offline or args.offline_codec else ' and not downloadable'}): "
              f"training EnCodec's architecture on this corpus ({args.codec_steps} steps), then fitting {N_Q} "
              f"residual codebooks; saved to {out / 'codec.pt'}")

    # --- the clips: a generator of (wav, info) in a fixed order
    if args.dataset == "synth":
        n_total = args.clips
        def clips():
            for i in range(args.clips):
                if f"synth-{i:06d}" not in done_ids:
                    yield synth_clip(args.seed, i, args.max_seconds, speech=not args.no_speech)
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

    work = out / f".work-{args_hash}"
    if args.force:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(exist_ok=True)

    # --- the offline codec learns to reconstruct the train split's first clips (resumable, see train_codec)
    codec_wavs = {}
    if not codec_info["pretrained"]:
        done_ids = set()
        muted.append(True)                            # pass 1 reports each bad input, once
        for wav, info in clips():
            if not is_val(info["id"], args.val_percent):
                codec_wavs[info["id"]] = wav
            if len(codec_wavs) >= args.codec_clips:
                break
        if not codec_wavs:                            # a dataset all in val: learn from what there is
            codec_wavs = {info["id"]: wav for wav, info in itertools.islice(clips(), args.codec_clips)}
        muted.clear()
        t0 = time.time()
        train_codec(codec, list(codec_wavs.values()), args.codec_steps, ckpt=work / "codec_train.pt", quiet=args.quiet)
        print(f"offline codec: trained {args.codec_steps} steps on {len(codec_wavs)} clips in {time.time() - t0:.0f}s")

    # --- pass 1: audio -> encoder outputs + mel, in batches (the slow part), with partial results saved in
    # chunks so an interrupted run resumes where it stopped
    infos, embs, mels, wmels = [], [], [], []         # wmels: Whisper's features, with --whisper_mel only
    audio_seconds = resumed_seconds = 0.0
    pbar = tqdm(total=n_total, unit="clip", disable=args.quiet, desc="encode", smoothing=0.1)
    batch, chunk_id, chunk_infos, chunk_embs, chunk_mels, chunk_wmels = [], 0, [], [], [], []
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
            if args.whisper_mel:
                chunk_wmels.append(whisper_log_mel(w).astype(np.float16))
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
        extra = {}
        if args.whisper_mel:                          # its own frame counts (100/s, not 75/s)
            extra = dict(wmel=np.concatenate(chunk_wmels), wlens=np.array([len(w) for w in chunk_wmels], np.int64))
        np.savez(tmp, emb=np.concatenate(chunk_embs), mel=np.concatenate(chunk_mels), lens=lens,
                 infos=np.array(json.dumps(chunk_infos)), **extra)
        os.replace(tmp, path)
        infos.extend(chunk_infos); embs.extend(chunk_embs); mels.extend(chunk_mels); wmels.extend(chunk_wmels)
        chunk_infos.clear(); chunk_embs.clear(); chunk_mels.clear(); chunk_wmels.clear()
        chunk_id += 1

    CHUNK = 128
    done_chunks = sorted(work.glob("chunk*[0-9].npz"))
    for path in done_chunks:                          # resume: reload finished chunks
        z = np.load(path)
        ci = json.loads(str(z["infos"]))
        offs = np.concatenate([[0], np.cumsum(z["lens"])])
        # the work dir is named by the arguments' hash, which holds --whisper_mel: its chunks have wmel when asked
        woffs = np.concatenate([[0], np.cumsum(z["wlens"])]) if args.whisper_mel else None
        for j, info in enumerate(ci):
            infos.append(info)
            embs.append(z["emb"][offs[j]:offs[j + 1]])
            mels.append(z["mel"][offs[j]:offs[j + 1]])
            if args.whisper_mel:
                wmels.append(z["wmel"][woffs[j]:woffs[j + 1]])
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
    if args.whisper_mel:
        wmels = [wmels[i] for i in order]

    # every output file is first written next to its final name, then all are renamed at the end, so a run that
    # fails leaves the previous output as it was
    staged = []
    def stage(fname):
        staged.append(fname)
        return out / f"{fname}.tmp{os.getpid()}"

    # --- the offline codec: fit its codebooks on a sample of encoder outputs, tune the decoder to them, report
    allemb = torch.from_numpy(np.concatenate(embs)).float()
    bounds = np.cumsum([0] + [len(e) for e in embs])  # clip i is allemb[bounds[i]:bounds[i + 1]]
    if not codec_info["pretrained"]:
        t0 = time.time()
        allemb = calibrate(codec, allemb)
        pick = np.random.default_rng(0).permutation(len(allemb))[:args.kmeans_frames]
        fit_codebooks(codec, allemb[torch.from_numpy(np.sort(pick))], iters=args.kmeans_iters)
        print(f"offline codec: fitted {N_Q} codebooks x {CODEBOOK_SIZE} on {len(pick)} frames in {time.time() - t0:.1f}s")
        row = {info["id"]: i for i, info in enumerate(infos)}
        ids = [i for i in codec_wavs if i in row]
        tune_decoder(codec, [codec_wavs[i] for i in ids], [allemb[bounds[row[i]]:bounds[row[i] + 1]] for i in ids],
                     args.codec_tune_steps, quiet=args.quiet)
        torch.save({"model": codec_state(codec), "fitted": True, "bandwidth": BANDWIDTH, "n_q": N_Q}, stage("codec.pt"))
        if args.dataset == "synth" and args.codec_report:
            probes = codec_probes(args.seed)
            report_, rec = codec_report(codec, probes, untrained=offline_codec())
            codec_info["report"] = report_
            print(f"offline codec on held-out clips, decode(encode(x)) at {BANDWIDTH:g} kbps: notes at the labelled pitch "
                  f"{report_['notes']:.0%} of {len(probes['note'])}, morse words read back {report_['morse']:.0%} of "
                  f"{len(probes['morse'])}, DTMF digits {report_['dtmf']:.0%} of {len(probes['dtmf'])}; log-mel L1 "
                  f"{report_['mel_l1']:.3f} (untrained decoder {report_['mel_l1_untrained']:.3f}, "
                  f"{report_['mel_l1_untrained'] / report_['mel_l1']:.1f}x higher)")
            panels = []
            for kind, j in [("note", 0), ("morse", 0), ("dtmf", 0), ("any", 0), ("any", 1)]:
                w, info = probes[kind][j]
                panels += [(f"input: {info['caption']}", log_mel(w)), ("reconstruction", log_mel(rec[kind][j]))]
            plot_mels(stage("codec.png"), panels, title="offline codec: log-mel of held-out input vs decode(encode(x))")
        print(f"offline codec: done in {time.time() - t0:.0f}s")

    # --- pass 2: quantize (cheap), tokenize, write the splits
    # quantizing is frame by frame, so all clips go through at once in big slices
    allcodes = torch.cat([quantize(codec, allemb[s:s + 16384]) for s in range(0, len(allemb), 16384)]).numpy().astype(np.uint16)
    codes = [allcodes[bounds[i]:bounds[i + 1]] for i in range(len(embs))]

    texts = list(PROMPT_TEXT)
    for info in infos:
        texts += [info.get(k) or "" for k in ("transcript", "caption", "description")]
        texts += [q["q"] + " " + q["a"] for q in info.get("qa", [])]
        texts += [" ".join(f"{k} {v}" for k, v in info["labels"].items())]
    # the text is stored as text; the corpus BPE is stored beside it for the configs that name tokenizer="corpus"
    # (those naming "gpt2" read the same text with GPT-2's BPE, loaded when the model loads the data)
    t0 = time.time()
    ranks = train_bpe(texts, args.vocab_size)
    save_ranks(ranks, stage(CORPUS_BPE_FILE))
    tok_info = {"name": "corpus", "file": CORPUS_BPE_FILE, "vocab_size": len(ranks) + 1, "eot_token": len(ranks),
                "special_tokens": {EOT: len(ranks)},
                "note": "the corpus BPE available with this data (byte-level, trained on its text), for configs with "
                        "tokenizer='corpus'; the clips' text is stored as text, so tokenizer='gpt2' reads it too"}
    print(f"tokenizer: corpus BPE of {len(ranks) + 1} tokens trained in {time.time() - t0:.1f}s -> {CORPUS_BPE_FILE} "
          f"(configs with tokenizer='gpt2' use GPT-2's BPE instead)")

    in_val = [is_val(info["id"], args.val_percent) for info in infos]
    if args.val_percent > 0 and len(infos) >= 2 and not any(in_val):
        in_val[-1] = True                             # a tiny dataset still gets a val clip (empty files cannot be mmapped)
    if all(in_val):
        in_val[0] = False
    splits = {}
    for split in ("train", "val"):
        idx = [i for i in range(len(infos)) if in_val[i] == (split == "val")]
        offset, woffset, lines = 0, 0, []
        for i in idx:
            info = dict(infos[i])
            rec = {"id": info["id"], "offset": offset, "frames": len(codes[i]), "source": info["source"],
                   "kind": info["kind"], "duration": info["duration"], "transcript": info.get("transcript"),
                   "caption": info.get("caption"), "description": info.get("description"),
                   "labels": info["labels"], "qa": info.get("qa", [])}
            if args.whisper_mel:
                rec["woffset"], rec["wframes"] = woffset, len(wmels[i])
                woffset += len(wmels[i])
            lines.append(json.dumps(rec))
            offset += len(codes[i])
        c = np.concatenate([codes[i] for i in idx]) if idx else np.zeros((0, N_Q), np.uint16)
        m = np.concatenate([mels[i] for i in idx]) if idx else np.zeros((0, N_MELS), np.float16)
        np.ascontiguousarray(c, dtype=np.uint16).tofile(stage(f"{split}_codes.bin"))
        np.ascontiguousarray(m, dtype=np.float16).tofile(stage(f"{split}_mel.bin"))
        if args.whisper_mel:
            wm = np.concatenate([wmels[i] for i in idx]) if idx else np.zeros((0, WHISPER_N_MELS), np.float16)
            np.ascontiguousarray(wm, dtype=np.float16).tofile(stage(f"{split}_wmel.bin"))
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
    if args.whisper_mel:
        meta["whisper_mel"] = {"n_mels": WHISPER_N_MELS, "frame_rate": WHISPER_FRAME_RATE, "sample_rate": WHISPER_SR,
                               "file": "{split}_wmel.bin (float16 [frames, 80]); clip at woffset, wframes",
                               "log": "as whisper.audio.log_mel_spectrogram, but the 8-decade floor is below the "
                                      "clip's own max (Whisper: its 30 s padded input's)"}
    stage("meta.json").write_text(json.dumps(meta, indent=2))
    if meta_path.exists():
        meta_path.unlink()                            # no meta.json = incomplete, while the files are swapped
    for fname in staged:                              # meta.json last
        os.replace(out / f"{fname}.tmp{os.getpid()}", out / fname)
    for split in ("train", "val"):                    # an earlier run's, no longer matching the codes
        (out / f"{split}_mel_c0.bin").unlink(missing_ok=True)
        if not args.whisper_mel:
            (out / f"{split}_wmel.bin").unlink(missing_ok=True)
    if args.codebook0_mel:
        codebook0_mels(out, args.quiet)
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
