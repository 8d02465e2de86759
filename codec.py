"""
Fitting the offline codec, for when the pretrained EnCodec 24 kHz cannot be had. prepare.py takes
EnCodec's own architecture (audio.offline_codec) and:
- sets it to a block DCT and its inverse (dct_init),
- can train the parts that leaves free with EnCodec's reconstruction objective (train_codec,
  tune_decoder; off by default, see docs/codec.md),
- fits its residual codebooks by k-means on the encoder's outputs (calibrate, fit_codebooks),
- measures on held-out clips how much of what their labels say survives decode(encode(x))
  (codec_report, with readers of pitch, Morse and DTMF).
Using the codec, once fitted, is audio.py's.
"""
import os
import sys
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
# EnCodec's reconstruction objective

_stft_mel = {}                    # window size -> (Hann window, mel filters), built once

def multiscale_mel_loss(x, y):
    """EnCodec's frequency-domain loss between x and y (B, n). STFT windows are 2^6 .. 2^11 samples
    (EnCodec's: 2^5 .. 2^11), hop a quarter window, with 64 mel filters (fewer for the short
    windows). Magnitudes are scaled so a full-scale sine reads ~1. The loss is L1 on the mel
    magnitudes plus L1 on their logs (EnCodec's: L1 + L2 on magnitudes): the log term makes the
    quiet parts count, and much of this audio is quiet."""
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

# -----------------------------------------------------------------------------
# the analytic start (ours; why and how: docs/codec.md)
#
# EnCodec's layers can hold a block transform exactly. Its strided convs split the samples into
# polyphase channels (at the frame rate, 320 channels of one sample each: the frame's block), its
# last conv takes a DCT of that block, and the decoder inverts both. A constant offset on every
# channel keeps each ELU in its linear range; the residual branches and LSTMs start as no-ops. So
# the codec starts as the audio low-passed at 4.8 kHz, block by block: the pitch passes, though a
# block DCT is no ideal filter (a 3 kHz tone comes back within ~3%).

OFFSET = 4.0                      # added before every ELU: its input stays > 0, where it is x
DCT_BINS = 128                    # one per latent channel: 0 .. 4.8 kHz

def dct_matrix(n=HOP, bins=DCT_BINS):
    """The first `bins` rows of the orthonormal DCT-II of n samples. The rows are orthonormal: the
    transpose maps coefficients back to samples, a low-pass of the block."""
    j = torch.arange(n, dtype=torch.float64)
    k = torch.arange(bins, dtype=torch.float64)[:, None]
    d = torch.cos(math.pi * (j + 0.5) * k / n) * math.sqrt(2 / n)
    d[0] /= math.sqrt(2)
    return d.float()

def set_weight_norm(conv, w, spare_gain=0.0):
    """Set a weight-normed conv's weight to w. An output channel whose weights are all zero has no
    direction: it gets a random one, with gain spare_gain x its norm. Its weight is then zero (the
    default) or small, and the norm stays defined."""
    g = w.flatten(1).norm(dim=1)
    dead = g == 0
    v = w.clone()
    v[dead] = torch.randn_like(v[dead])
    g[dead] = spare_gain * v[dead].flatten(1).norm(dim=1)
    conv.weight_v.data.copy_(v)
    conv.weight_g.data.copy_(g.view_as(conv.weight_g))

def offset_bias(conv, w, out_offset, transposed=False):
    """The bias that makes conv(x + OFFSET) = w * x + out_offset. Transposed (kernel 2 x stride):
    each output phase sums its taps over two input frames, so the bias is exact when every phase's
    taps sum the same, as dct_init's one-hot weights do."""
    taps = w.sum((0, 2)) / conv.stride[0] if transposed else w.sum((1, 2))
    conv.bias.data.copy_(out_offset - OFFSET * taps)

def no_op_resblock(block):
    """A SEANet residual block that passes its input: the shortcut the identity, the branch's
    last conv zero."""
    shortcut = block.shortcut.conv.conv
    set_weight_norm(shortcut, torch.eye(shortcut.weight_v.shape[0])[:, :, None])
    shortcut.bias.data.zero_()
    last = block.block[-1].conv.conv
    last.weight_g.data.zero_()
    last.bias.data.zero_()

def no_op_lstm(slstm):
    """SEANet's LSTM adds its output to its input. With the cell-input gate's weights and biases
    at zero, the cell stays 0 and so does the output."""
    lstm, h = slstm.lstm, slstm.lstm.hidden_size
    for p in lstm.parameters():
        p.data[2 * h:3 * h] = 0                      # gates in order i, f, g, o

@torch.no_grad()
def dct_init(model):
    """Set the encoder to blocks of HOP samples -> their first DCT_BINS DCT coefficients, and the
    decoder to the inverse (see above). decode(encode(x)) is then x low-passed below 4.8 kHz,
    block by block."""
    # EnCodec 24 kHz's layout: encoder conv, 4 x (residual block, ELU, strided conv), LSTM, ELU,
    # conv; the decoder mirrors it with transposed convs
    enc, dec = model.encoder.model, model.decoder.model
    dct = dct_matrix()
    first = enc[0].conv.conv                          # channel 0 = the samples
    w = torch.zeros(first.weight_v.shape)
    w[0, 0, -1] = 1
    set_weight_norm(first, w)
    first.bias.data.fill_(OFFSET)
    n = 1                                             # polyphase channels so far
    for block, down in ((1, 3), (4, 6), (7, 9), (10, 12)):
        no_op_resblock(enc[block])
        conv = enc[down].conv.conv                    # causal: last `stride` taps = the new block
        (c_out, c_in, k), s = conv.weight_v.shape, conv.stride[0]
        w = torch.zeros(c_out, c_in, k)
        for j in range(n * s):                        # sample j of the new block
            w[j, j % n, k - s + j // n] = 1
        set_weight_norm(conv, w)
        offset_bias(conv, w, OFFSET)
        n *= s
    no_op_lstm(enc[13])
    last = enc[15].conv.conv
    w = torch.zeros(last.weight_v.shape)
    w[:, :HOP, -1] = dct
    set_weight_norm(last, w)
    offset_bias(last, w, 0.0)
    first = dec[0].conv.conv                          # the inverse DCT: samples of this block
    w = torch.zeros(first.weight_v.shape)
    w[:HOP, :, -1] = dct.T
    # rows past HOP get a tiny random direction: calibrate re-derives weight_g from each row's
    # norm, and an all-zero row would give 0/0
    set_weight_norm(first, w, spare_gain=1e-3)
    first.bias.data.fill_(OFFSET)
    no_op_lstm(dec[1])
    n = HOP
    for up, block in ((3, 4), (6, 7), (9, 10), (12, 13)):
        conv = dec[up].convtr.convtr                  # polyphase channels back into samples
        (c_in, c_out, k), s = conv.weight_v.shape, conv.stride[0]
        w = torch.zeros(c_in, c_out, k)
        for c in range(n // s):
            for i in range(s):
                w[(n // s) * i + c, c, i] = 1
        set_weight_norm(conv, w)
        offset_bias(conv, w, OFFSET, transposed=True)
        no_op_resblock(dec[block])
        n //= s
    out = dec[15].conv.conv
    w = torch.zeros(out.weight_v.shape)
    w[0, 0, -1] = 1
    set_weight_norm(out, w)
    offset_bias(out, w, 0.0)
    return model

# -----------------------------------------------------------------------------
# training the learned parts on the reconstruction objective (off by default: docs/codec.md)

def random_crops(wavs, n, batch, rng):
    """batch crops of n samples (whole frames) from random clips, zero padded past a clip's end. A
    near-silent crop is redrawn (silence teaches little), until 20 x batch draws have been made.
    Returns (batch, n) float32 and each crop's (clip, first frame)."""
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
            xs.append(x)
            where.append((i, f))
    return torch.from_numpy(np.stack(xs)), where

def codec_step(opt, params, loss):
    """One optimiser step of the codec's training, gradient norm clipped at 1."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()

def learned_parts(net):
    """The parameters that dct_init leaves as no-ops in net (the codec, or its encoder or
    decoder): the residual branches and the LSTMs. Training them adds to the analytic path;
    training every weight scrambles it (docs/codec.md)."""
    return [p for name, p in net.named_parameters() if ".block." in name or ".lstm." in name]

def train_codec(model, wavs, steps, batch=4, crop_seconds=0.3, lr=1e-4, ckpt=None, quiet=False,
                save_every=25):
    """Start the offline codec from dct_init, then train its learned parts (see learned_parts) as
    an autoencoder on 24 kHz clips with EnCodec's reconstruction loss. The codebooks are fitted
    afterwards (fit_codebooks). steps=0 is the analytic codec alone.
    Resumable: every save_every steps the model, the optimiser, the schedule and the step go to
    ckpt (written to a temporary file, then renamed). Each step draws its crops from a seed of its
    own, so a resumed run ends with the weights of an uninterrupted one."""
    params = learned_parts(model)
    opt = torch.optim.Adam(params, lr, betas=(0.5, 0.9))
    # a short warmup, then cosine down to a tenth: the few steps a CPU budget allows end on a
    # settled model
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / 20,
                           0.55 + 0.45 * math.cos(math.pi * min(1.0, s / max(1, steps)))))
    step = 0
    if ckpt and Path(ckpt).exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step = state["step"]
    else:
        dct_init(model)
    n = int(crop_seconds * SAMPLE_RATE) // HOP * HOP
    model.train()
    pbar = tqdm(total=steps, initial=step, unit="step", desc="train codec",
                disable=quiet or not steps)
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
            try:
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                            "sched": sched.state_dict(), "step": step}, tmp)
            except BaseException as e:
                tmp.unlink(missing_ok=True)  # a part left on a full disk would keep it full
                if isinstance(e, (OSError, RuntimeError)):  # torch.save's on a full disk
                    sys.exit(f"error: {ckpt}: cannot be written ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]}); is the disk full? The last saved "
                             f"step is kept: the same command resumes")
                raise
            os.replace(tmp, ckpt)
    pbar.close()
    return model.eval()

# -----------------------------------------------------------------------------
# the codebooks: k-means on the encoder's outputs, then (optionally) the decoder tuned to the codes

def assign_nearest(x, means, chunk=8192, return_dist=False):
    """Index of the nearest of means for each row of x (with return_dist, also its squared
    distance), chunk rows at a time."""
    idx, dst = [], []
    m2 = (means ** 2).sum(1)
    for s in range(0, len(x), chunk):
        d = m2[None] - 2 * x[s:s + chunk] @ means.T
        v, i = d.min(1)
        idx.append(i)
        dst.append(v + (x[s:s + chunk] ** 2).sum(1))
    return (torch.cat(idx), torch.cat(dst)) if return_dist else torch.cat(idx)

def kmeans(x, k, iters, gen):
    """Lloyd's k-means on the distinct rows of x (N, D), weighted by how often each occurs.
    Identical frames (digital silence, steady tones) would otherwise seed identical centroids, and
    exact ties make codes flip on rounding noise. The init draws k points with gen; an empty
    cluster restarts at the point worst served by its centroid. Returns (means (k, D), counts
    (k,)); with fewer distinct points than k, the spare centroids sit far away."""
    pts, inv = torch.unique(x, dim=0, return_inverse=True)
    w = torch.bincount(inv, minlength=len(pts)).float()
    n = len(pts)
    if n <= k:
        far = pts.abs().max() * 1e3 + 1e3          # spare codes no frame will ever choose
        spare = far + torch.arange(k - n, dtype=x.dtype)[:, None].expand(-1, x.shape[1])
        return torch.cat([pts, spare]), torch.cat([w, torch.zeros(k - n)])
    means = pts[torch.randperm(n, generator=gen)[:k]].clone()
    for _ in range(iters):
        assign, dist = assign_nearest(pts, means, return_dist=True)
        counts = torch.zeros(k).index_add_(0, assign, w)
        sums = torch.zeros_like(means).index_add_(0, assign, pts * w[:, None])
        means = sums / counts.clamp_min(1e-9)[:, None]
        empty = (counts == 0).nonzero().flatten()
        if len(empty):
            means[empty] = pts[torch.topk(dist * w, len(empty)).indices]
    assign = assign_nearest(pts, means)
    return means, torch.zeros(k).index_add_(0, assign, w)

@torch.no_grad()
def calibrate(model, emb):
    """Standardise the encoder's output per channel on this corpus, for k-means. The DCT's low
    bins are ~100x larger than its high ones, and a trained encoder's outputs can sit in a tiny
    cloud far from zero, where float rounding alone flips nearest-codeword choices.
    A Standardize is appended to the encoder, and its inverse folded into the decoder's first conv
    (exact: a constant offset survives the reflect padding). emb (N, 128) are outputs of the
    encoder as it was. Returns them standardised by the very same op, so stored codes equal what
    the calibrated encoder gives."""
    std = Standardize(emb.shape[1]).fit(emb)
    model.encoder.model.append(std)
    dec = model.decoder.model[0].conv.conv
    w = torch._weight_norm(dec.weight_v, dec.weight_g, 0)
    dec.bias.data.add_((w * std.mean[None, :, None]).sum((1, 2)))
    w = w * std.std[None, :, None]
    dec.weight_v.data.copy_(w)
    dec.weight_g.data.copy_(w.norm(dim=(1, 2), keepdim=True))
    return std(emb.T[None])[0].T

def fit_codebooks(model, emb, iters=12, seed=0, quiet=False):
    """Fit the first N_Q residual codebooks by k-means on encoder outputs emb (N, 128), layer after
    layer on the residual, as EnCodec's quantizer does at its first training step (kmeans_init)."""
    gen = torch.Generator().manual_seed(seed)
    residual = emb.float().clone()
    # each codebook takes seconds on a big sample: a bar shows the rate and the ETA
    for layer in tqdm(model.quantizer.vq.layers[:N_Q], unit="codebook", desc="fit codebooks",
                      disable=quiet):
        cb = layer._codebook
        means, counts = kmeans(residual, cb.codebook_size, iters, gen)
        cb.embed.data.copy_(means)
        cb.embed_avg.data.copy_(means)
        cb.cluster_size.data.copy_(counts)
        cb.inited.data.fill_(1.0)
        residual = residual - means[assign_nearest(residual, means)]
    return model

def tune_decoder(model, wavs, embs, steps, batch=4, crop_seconds=0.4, lr=1e-4, quiet=False):
    """After the codebooks are fitted, train the decoder's learned parts (see learned_parts) on
    what the decoder will be given: quantized encoder outputs. Each crop keeps the first 1, 2, 4
    or all 8 codebooks, as EnCodec samples its bandwidth per batch, so that codebook 0 alone (all
    that Whisper-GPT generates) decodes to audio too. wavs and embs (standardised encoder outputs,
    (frames, 128) each) are paired clip by clip."""
    levels = [1, 2, 4, N_Q]
    with torch.no_grad():
        codes = [quantize(model, e).T[:, None] for e in embs]                  # (n_q, 1, frames)
        # (128, frames) per level
        qs = [[model.quantizer.decode(c[:k])[0] for k in levels] for c in codes]
    params = learned_parts(model.decoder)
    opt = torch.optim.Adam(params, lr, betas=(0.5, 0.9))
    rng = np.random.default_rng(11)
    frames = int(crop_seconds * FRAME_RATE)
    model.train()
    for _ in tqdm(range(steps), unit="step", desc="tune decoder", disable=quiet or not steps):
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
def reconstruct(model, wavs, quantized=True, n_q=N_Q):
    """decode(encode(x)) for each 1-D clip in wavs, trimmed to the clip's length. The decoder reads
    the codes at 6 kbps, or only their first n_q codebooks, or (quantized=False) the encoder's
    output itself. Batched: EnCodec is causal, so zeros after a shorter clip change nothing in
    it."""
    embs = encode_emb(model, wavs)
    T = max(len(e) for e in embs)
    z = torch.zeros(len(wavs), embs[0].shape[1], T)
    for i, e in enumerate(embs):
        z[i, :, :len(e)] = (model.quantizer.decode(quantize(model, e).T[:n_q, None])[0]
                            if quantized else e.T)
    y = model.decoder(z)[:, 0]
    return [y[i, :len(w)].numpy() for i, w in enumerate(wavs)]

def envelope_runs(x, win=0.005, rel=0.3, min_run=0.01):
    """On/off runs of a signal's RMS envelope (over win seconds; on above rel x its peak): a list
    of (on, start, end) in samples. A run shorter than min_run seconds (a click, a dropout) joins
    the run before it: a debounce (docs/codec.md)."""
    w = max(1, int(win * SAMPLE_RATE))
    env = np.sqrt(np.convolve(np.asarray(x, np.float64) ** 2, np.ones(w) / w, "same"))
    on = env > rel * env.max()
    edges = np.concatenate([[0], np.flatnonzero(np.diff(on.astype(int))) + 1, [len(on)]])
    runs = []
    for a, b in zip(edges[:-1], edges[1:]):
        if runs and (b - a < min_run * SAMPLE_RATE or runs[-1][0] == bool(on[a])):
            runs[-1][2] = int(b)
        else:
            runs.append([bool(on[a]), int(a), int(b)])
    return [tuple(r) for r in runs]

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
    # the unit: the shortest run, mark or gap (a gap inside a letter is 1 unit); the marks alone
    # would read a word of dashes only ("to") as dots
    unit = min(d for on, d in runs)
    letters = {v: k for k, v in MORSE.items()}
    word, sym = "", ""
    for on, d in runs:
        if on:
            sym += "." if d < 2 * unit else "-"
        elif d > 2 * unit:                            # a gap between letters
            word, sym = word + letters.get(sym, "?"), ""
    return word + letters.get(sym, "?")

def goertzel_power(x, hz):
    """The power of x at hz: one DFT bin, what a Goertzel filter computes."""
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
    cumulative-mean-normalised difference function, refined by parabolic interpolation. 0.0 for
    silence, or a clip shorter than two periods of fmin."""
    x = np.asarray(x, np.float64)
    taus = np.arange(1, int(SAMPLE_RATE / fmin))
    n = len(x) - taus[-1]
    if n < taus[-1] or not np.any(x):
        return 0.0
    d = np.array([np.sum((x[:n] - x[t:t + n]) ** 2) for t in taus])
    dn = d * taus / np.maximum(np.cumsum(d), 1e-12)
    lo = int(SAMPLE_RATE / fmax)
    cand = np.flatnonzero(dn[lo:] < threshold)
    i = min(lo + (cand[0] if len(cand) else int(np.argmin(dn[lo:]))), len(dn) - 2)
    while i + 2 < len(dn) and dn[i + 1] < dn[i]:  # down to the dip, keeping a right neighbour
        i += 1
    a, b, c = dn[i - 1], dn[i], dn[i + 1]
    curve = a - 2 * b + c
    return SAMPLE_RATE / (taus[i] + (0.5 * (a - c) / curve if curve else 0.0))

def read_note(x):
    """The note name (e.g. 'A4') nearest to a clip's pitch, read just after its attack; "" when no
    pitch can be read (silence, too short)."""
    f = read_pitch(x[2000:SAMPLE_RATE // 2])
    if not f:
        return ""
    return midi_name(int(round(69 + 12 * np.log2(max(f, 1.0) / 440))))

def codec_probes(seed, n_notes=30, n_morse=20, n_dtmf=20, n_any=12, max_dur=3.0, speech=True):
    """Held-out clips for the codec's report, drawn with seeds the corpus never uses: single notes
    of the harmonic instruments (sine, square, sawtooth, plucked string), morse words, DTMF digits,
    and clips of every kind (speech allowed in every other one, unless speech=False: no speech
    library)."""
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
    probes["any"] = [synth_clip(seed + 1, j, max_dur, speech=speech and j % 2 == 0)
                     for j in range(n_any)]
    return probes

def codec_report(model, probes, untrained=None):
    """How well decode(encode(x)) keeps what the corpus's labels say. The figures:
    notes             the fraction of notes whose pitch reads as the labelled note (the note
                      nearest to it: within half a semitone)
    morse, dtmf       the fraction of Morse words and DTMF digit strings read back exactly
    mel_l1            the log-mel L1 between the "any" clips and their reconstructions
    notes_codebook0   notes, decoded from codebook 0 alone: all that Whisper-GPT generates
    mel_l1_untrained  mel_l1 of the untrained codec `untrained`, when given: its random
                      encoder's unquantized output into its random decoder
    clips             how many probes of each kind
    Returns the figures and the reconstructions ({kind: [audio]}, in the order of probes)."""
    rec = {k: reconstruct(model, [w for w, _ in v]) for k, v in probes.items()}
    refs = [log_mel(w) for w, _ in probes["any"]]
    mel_l1 = lambda ys: float(np.mean([np.abs(log_mel(y) - ref).mean()
                                       for y, ref in zip(ys, refs)]))
    notes = lambda ys: float(np.mean([read_note(y) == info["labels"]["pitch"]
                                      for y, (_, info) in zip(ys, probes["note"])]))
    r = {"notes": notes(rec["note"]),
         "morse": float(np.mean([read_morse(y) == info["transcript"]
                                 for y, (_, info) in zip(rec["morse"], probes["morse"])])),
         "dtmf": float(np.mean([read_dtmf(y) == info["labels"]["digits"]
                                for y, (_, info) in zip(rec["dtmf"], probes["dtmf"])])),
         "mel_l1": mel_l1(rec["any"])}
    r["notes_codebook0"] = notes(reconstruct(model, [w for w, _ in probes["note"]], n_q=1))
    if untrained is not None:
        r["mel_l1_untrained"] = mel_l1(reconstruct(untrained, [w for w, _ in probes["any"]],
                                                   quantized=False))
    r["clips"] = {k: len(v) for k, v in probes.items()}
    return r, rec
