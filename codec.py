"""
Fitting the offline codec, for when the pretrained EnCodec 24 kHz cannot be had: prepare.py trains
EnCodec's own architecture (audio.offline_codec) on the corpus's audio with EnCodec's reconstruction
objective (train_codec), fits its residual codebooks by k-means on the encoder's outputs
(fit_codebooks), tunes the decoder to the codes (tune_decoder), and measures on held-out clips how
much of what their labels say survives decode(encode(x)) (codec_report, with readers of pitch,
Morse and DTMF). See docs/codec.md. Using the codec, once fitted, is audio.py's.
"""
import os
import math
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from audio import (FRAME_RATE, HOP, N_MELS, N_Q, SAMPLE_RATE, Standardize, encode_emb, log_mel,
                   mel_filterbank, n_frames, quantize)
from synth import (DTMF_HIGH, DTMF_KEYS, DTMF_LOW, MORSE, make_dtmf, make_morse, make_music,
                   midi_name, synth_clip)

# -----------------------------------------------------------------------------
# training: EnCodec's reconstruction objective on the corpus's own audio

_stft_mel = {}

def multiscale_mel_loss(x, y):
    """EnCodec's frequency-domain loss over STFT windows of 2^6 .. 2^11 samples (EnCodec: 2^5 ..
    2^11), hop a quarter window, mel filters (64, fewer for the short windows), magnitudes scaled so
    a full-scale sine reads ~1: L1 on the mel magnitudes plus L1 on their logs (EnCodec: L1 + L2 on
    magnitudes; the log term makes the quiet parts count, and much of this audio is quiet). x, y:
    (B, n)."""
    loss = 0.0
    for i in range(6, 12):
        n = 2 ** i
        if n not in _stft_mel:
            _stft_mel[n] = (torch.hann_window(n),
                            torch.from_numpy(mel_filterbank(min(N_MELS, n // 8), n)))
        win, fb = _stft_mel[n]
        mags = [fb @ torch.stft(z, n, n // 4, window=win, return_complex=True).abs() * (4.0 / n)
                for z in (x, y)]
        loss = loss + (mags[0] - mags[1]).abs().mean() + \
            (torch.log(mags[0] + 1e-3) - torch.log(mags[1] + 1e-3)).abs().mean()
    return loss / 6

def codec_loss(x, y):
    """EnCodec's reconstruction loss, weights as in the paper: 0.1 x time-domain L1 + 1 x
    multi-scale mel."""
    return 0.1 * (x - y).abs().mean() + multiscale_mel_loss(x, y)

def random_crops(wavs, n, batch, rng):
    """batch crops of n samples (whole frames) from random clips, zero padded at a clip's end, with
    some sound in them where the clips have any (silence teaches little). Returns (batch, n) float32
    and the crops' first frames."""
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
    """Layer-sequential unit-variance init (LSUV, Mishkin & Matas 2016) of a SEANet encoder or
    decoder: with PyTorch's default init every conv shrinks its input's variance ~3x, so after
    EnCodec's ~20 convs a random network's output no longer depends on its input (the untrained
    decoder plays one fixed buzz whatever it is given) and gradients vanish. Zero the biases, then
    in forward order rescale each conv's weight-norm gain so that its output on x has unit std (the
    last one: last_std). The architecture is untouched."""
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

def train_codec(model, wavs, steps, batch=4, crop_seconds=0.3, lr=1e-3, ckpt=None, quiet=False,
                save_every=25):
    """Train the offline codec's encoder and decoder as an autoencoder on 24 kHz clips (EnCodec's
    reconstruction loss; its codebooks are fitted afterwards by k-means, see fit_codebooks).
    Resumable: every save_every steps the model, the optimiser and the step go to ckpt (written to a
    temporary file, then renamed), and each step's crops are drawn from a seed of its own, so a
    resumed run ends with the weights of an uninterrupted one."""
    params = list(model.encoder.parameters()) + list(model.decoder.parameters())
    opt = torch.optim.Adam(params, lr, betas=(0.5, 0.9))
    # a short warmup, then cosine down to a tenth: the few steps a CPU budget allows end on a
    # settled model
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / 20,
                           0.55 + 0.45 * math.cos(math.pi * min(1.0, s / max(1, steps)))))
    step = 0
    if not isinstance(model.encoder.model[-1], Standardize):
        model.encoder.model.append(Standardize())
    if ckpt and Path(ckpt).exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step = state["step"]
    else:                                             # a fresh start: signal must get through both
                                                      # halves
        x, _ = random_crops(wavs, int(0.4 * SAMPLE_RATE) // HOP * HOP, 8, np.random.default_rng(3))
        unit_variance_init(model.encoder, x[:, None])
        # the encoder's output standardised: unit scale for the decoder
        with torch.no_grad():
            e = torch.cat(encode_emb(model, wavs[:64]))
        model.encoder.model[-1].fit(e)
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
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "step": step}, tmp)
            os.replace(tmp, ckpt)
    pbar.close()
    return model.eval()

# -----------------------------------------------------------------------------
# the codebooks: k-means on the trained encoder's outputs, then the decoder tuned to the codes

def kmeans(x, k, iters, gen):
    """Lloyd's k-means on the distinct rows of x (N, D), weighted by how often each occurs.
    Identical frames (digital silence, steady tones) would otherwise seed identical centroids, and
    exact ties make codes flip on rounding noise. Seeded init; an empty cluster restarts at the
    point worst served by its centroid. Returns (means (k, D), counts (k,)); with fewer distinct
    points than k, the spare centroids sit far away."""
    pts, inv = torch.unique(x, dim=0, return_inverse=True)
    w = torch.bincount(inv, minlength=len(pts)).float()
    n = len(pts)
    if n <= k:
        far = pts.abs().max() * 1e3 + 1e3          # spare codes no frame will ever choose
        means = torch.cat([pts, far + torch.arange(k - n,
                                                   dtype=x.dtype)[:, None].expand(-1, x.shape[1])])
        return means, torch.cat([w, torch.zeros(k - n)])
    means = pts[torch.randperm(n, generator=gen)[:k]].clone()
    for _ in range(iters):
        assign, dist = assign_nearest(pts, means, return_dist=True)
        counts = torch.zeros(k).index_add_(0, assign, w)
        sums = torch.zeros_like(means).index_add_(0, assign, pts * w[:, None])
        means = sums / counts.clamp_min(1e-9)[:, None]
        empty = (counts == 0).nonzero().flatten()
        # restart empty clusters at the worst-served points
        if len(empty):
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

@torch.no_grad()
def calibrate(model, emb):
    """Standardise the encoder's output per channel on this corpus, for k-means: an untrained
    encoder's outputs sit in a tiny cloud far from zero (spread ~1e-3 around an offset of ~3e-2),
    where float rounding alone flips nearest-codeword choices. A Standardize is appended to the
    encoder and its inverse folded into the decoder's first conv (a constant offset survives the
    reflect padding, so that is exact). emb (N, 128): outputs of the encoder as it was; returns them
    standardised by the very same op, so stored codes equal what the calibrated encoder gives."""
    std = Standardize(emb.shape[1]).fit(emb)
    model.encoder.model.append(std)
    dec = model.decoder.model[0].conv.conv
    w = torch._weight_norm(dec.weight_v, dec.weight_g, 0)
    dec.bias.data.add_((w * std.mean[None, :, None]).sum((1, 2)))
    w = w * std.std[None, :, None]
    dec.weight_v.data.copy_(w)
    dec.weight_g.data.copy_(w.norm(dim=(1, 2), keepdim=True))
    return std(emb.T[None])[0].T

def fit_codebooks(model, emb, iters=12, seed=0):
    """Fit the first N_Q residual codebooks by k-means on encoder outputs emb (N, 128), as EnCodec's
    quantizer does at its first training step (there with kmeans_init), layer after layer on the
    residual."""
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

def tune_decoder(model, wavs, embs, steps, batch=4, crop_seconds=0.4, lr=3e-4, quiet=False):
    """After the codebooks are fitted, the decoder alone learns from what it will be given:
    quantized encoder outputs. Each crop keeps the first 1, 2, 4 or all 8 codebooks (EnCodec samples
    its bandwidth per batch the same way), so decoding codebook 0 alone, as Whisper-GPT's samples
    are, gives audio too. wavs and embs (standardised encoder outputs, (frames, 128)) are paired
    clip by clip."""
    levels = [1, 2, 4, N_Q]
    with torch.no_grad():
        codes = [quantize(model, e).T[:, None] for e in embs]                  # (n_q, 1, frames)
        # (128, frames) per level
        qs = [[model.quantizer.decode(c[:k])[0] for k in levels] for c in codes]
    params = list(model.decoder.parameters())
    opt = torch.optim.Adam(params, lr, betas=(0.5, 0.9))
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
        codec_step(opt, params, codec_loss(x, y))
    return model.eval()

def codec_state(model):
    """State dict without the unused codebooks (layers >= N_Q stay all-zero and unfitted) and
    without embed_avg."""
    drop = tuple(f"quantizer.vq.layers.{i}." for i in range(N_Q, len(model.quantizer.vq.layers)))
    return {k: v for k, v in model.state_dict().items() if not k.startswith(drop)
            and not k.endswith("embed_avg")}

# -----------------------------------------------------------------------------
# the report: decode(encode(x)) on held-out clips, and the corpus's labels read back from audio

@torch.no_grad()
def reconstruct(model, wavs, quantized=True):
    """decode(encode(x)) for each 1-D clip in wavs, through the codes at 6 kbps (or,
    quantized=False, straight from the encoder's output), each trimmed to its input's length.
    Batched: EnCodec is causal, so zeros after a shorter clip change nothing in it."""
    embs = encode_emb(model, wavs)
    T = max(len(e) for e in embs)
    z = torch.zeros(len(wavs), embs[0].shape[1], T)
    for i, e in enumerate(embs):
        z[i, :, :len(e)] = model.quantizer.decode(quantize(model,
                                                           e).T[:, None])[0] if quantized else e.T
    y = model.decoder(z)[:, 0]
    return [y[i, :len(w)].numpy() for i, w in enumerate(wavs)]

def envelope_runs(x, win=0.005, rel=0.3):
    """On/off runs of a signal's RMS envelope: a list of (on, start, end) in samples."""
    w = max(1, int(win * SAMPLE_RATE))
    env = np.sqrt(np.convolve(np.asarray(x, np.float64) ** 2, np.ones(w) / w, "same"))
    on = env > rel * env.max()
    edges = np.concatenate([[0], np.flatnonzero(np.diff(on.astype(int))) + 1, [len(on)]])
    return [(bool(on[a]), int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]

def read_morse(x):
    """The word a morse clip spells (dots and dashes from the envelope; '?' for a symbol that is no
    letter)."""
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
            digits += keys[(max(lows, key=lambda f: goertzel_power(seg, f)),
                            max(highs, key=lambda f: goertzel_power(seg, f)))]
    return digits

def read_pitch(x, fmin=60.0, fmax=1200.0, threshold=0.15):
    """Fundamental frequency in Hz by YIN (de Cheveigne & Kawahara 2002): the first dip of the
    cumulative-mean- normalised difference function, refined by parabolic interpolation."""
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
    """Held-out clips for the codec's report, drawn with seeds the corpus never uses: single notes
    of the harmonic instruments (sine, square, sawtooth, plucked string), morse words, DTMF digits,
    and clips of every kind."""
    probes, i = {"note": [], "morse": [], "dtmf": [], "any": []}, 0
    want = {"note": n_notes, "morse": n_morse, "dtmf": n_dtmf}
    while any(len(probes[k]) < n for k, n in want.items()):
        rng = np.random.default_rng([seed, 1 << 30, i])
        i += 1
        kind = ["note", "morse", "dtmf"][i % 3]
        if len(probes[kind]) >= want[kind]:
            continue
        wav, info = {"note": make_music, "morse": make_morse, "dtmf": make_dtmf}[kind](rng, max_dur)
        if kind == "note" and (info["labels"]["form"] != "note"
                               or info["labels"]["instrument"] == "bell"):
            continue
        probes[kind].append((wav, info))
    # seed + 1: not the corpus's clips
    probes["any"] = [synth_clip(seed + 1, j, max_dur, speech=speech) for j, speech in
                     zip(range(n_any), [True, False] * n_any)]
    return probes

def codec_report(model, probes, untrained=None):
    """How well decode(encode(x)) keeps what the corpus's labels say: the fraction of notes whose
    pitch reads as the labelled note (within a semitone), of morse words and DTMF digit strings read
    back exactly, and the log-mel L1 between input and reconstruction, also for the untrained
    decoder when given (fed the unquantized encoder output). Returns the figures and the
    reconstructions ({kind: [audio]}, in the order of probes)."""
    rec = {k: reconstruct(model, [w for w, _ in v]) for k, v in probes.items()}
    refs = [log_mel(w) for w, _ in probes["any"]]
    mel_l1 = lambda ys: float(np.mean([np.abs(log_mel(y) - ref).mean()
                                       for y, ref in zip(ys, refs)]))
    r = {"notes": float(np.mean([read_note(y) == info["labels"]["pitch"]
                                 for y, (_, info) in zip(rec["note"], probes["note"])])),
         "morse": float(np.mean([read_morse(y) == info["transcript"]
                                 for y, (_, info) in zip(rec["morse"], probes["morse"])])),
         "dtmf": float(np.mean([read_dtmf(y) == info["labels"]["digits"]
                                for y, (_, info) in zip(rec["dtmf"], probes["dtmf"])])),
         "mel_l1": mel_l1(rec["any"])}
    if untrained is not None:
        r["mel_l1_untrained"] = mel_l1(reconstruct(untrained, [w for w, _ in probes["any"]],
                                                   quantized=False))
    r["clips"] = {k: len(v) for k, v in probes.items()}
    return r, rec
