"""prepare.py and the data contract it writes (audio.py): frame alignment, the mel against a direct
DFT, the resampler, the corpus (deterministic, text matching audio), the written arrays, bad input
handling, the offline codec and tokenizer."""
import gc
import json
import math
import re
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import audio as A
import codec as C
import prepare as P
import synth as Y
import tokenizer as T

SR = 24000


def sine(hz, seconds, sr=SR, amp=0.5):
    return (amp * np.sin(2 * np.pi * hz * np.arange(int(seconds * sr)) / sr)).astype(np.float32)


# ----------------------------------------------------------------------------- alignment

def test_codec_and_mel_frame_counts_agree_for_many_lengths():
    codec = A.offline_codec()
    for n in [1, 100, 319, 320, 321, 639, 640, 641, 1000, 4799, 4800, 4801, 9601]:
        x = torch.randn(1, 1, n) * 0.1
        with torch.no_grad():
            t_codec = codec.encoder(x).shape[-1]
        t_mel = A.log_mel(x[0, 0].numpy()).shape[0]
        assert t_codec == t_mel == math.ceil(n / 320) == A.n_frames(n), n


def test_mel_frame_i_is_centred_on_codec_block_i():
    codec = A.offline_codec()
    for j in [0, 3, 8, 17]:
        x = np.zeros(320 * 24, np.float32)
        x[320 * j + 160] = 1.0                       # an impulse in the middle of block j
        energy = A.log_mel(x).mean(axis=1)
        assert int(np.argmax(energy)) == j
        assert energy[j - 1 if j else j + 1] < energy[j] - 0.2 or j == 0
        # and the causal codec first reacts at the same frame: frames < j are untouched (EnCodec
        # pads the start of each conv by reflection, so frame 0 alone also hears the first few
        # frames: check past that edge)
        if j < 8:
            continue
        with torch.no_grad():
            a = codec.encoder(torch.zeros(1, 1, len(x)))
            b = codec.encoder(torch.from_numpy(x)[None, None])
        changed = ((a - b).abs().amax(dim=1)[0] > 1e-6).nonzero().flatten()
        assert changed[0].item() == j


@pytest.fixture(scope="module")
def codec(synth_dir):
    return A.load_codec(synth_dir)


def test_features_match_stored_corpus(synth_dir, codec):
    """Regenerate clips from their ids, run features() with the saved codec: same codes and mel as
    the files."""
    meta = json.loads(Path(synth_dir, "meta.json").read_text())
    clips = [json.loads(l) for l in Path(synth_dir, "train_clips.jsonl").read_text().splitlines()]
    codes = np.memmap(Path(synth_dir, "train_codes.bin"), np.uint16,
                      mode="r").reshape(-1, meta["n_q"])
    mel = np.memmap(Path(synth_dir, "train_mel.bin"), np.float16,
                    mode="r").reshape(-1, meta["n_mels"])
    for c in clips[:4]:
        wav, info = Y.synth_clip(meta["args"]["seed"], int(c["id"].split("-")[1]),
                                 meta["args"]["max_seconds"], speech=not meta["args"]["no_speech"])
        assert info["caption"] == c["caption"]
        k, m = A.features(wav, codec)
        assert k.shape == (c["frames"], 8) and m.shape == (c["frames"], 64)
        stored = codes[c["offset"]:c["offset"] + c["frames"]]
        # the coarse stream: the same alone or in a batch
        assert (k[:, 0] == stored[:, 0]).mean() > 0.98
        # deep residual codebooks may flip a rare near-tie
        assert (k == stored).mean() > 0.95
        np.testing.assert_allclose(m, mel[c["offset"]:c["offset"] + c["frames"]].astype(np.float32),
                                   atol=2e-3)


def test_short_clips_encode_the_same_alone_and_in_a_batch():
    """EnCodec's convs pad their start by reflection, which an input shorter than a kernel (a clip
    under 7 frames) cannot give: encode_emb pads every batch to at least 7 frames, so a short clip's
    encoder frames are the same alone and beside a long one. Dense random weights: a pretrained
    EnCodec's case (the offline codec's convs hide it)."""
    torch.manual_seed(0)
    model = A.offline_codec().eval()
    rng = np.random.default_rng(0)
    long = rng.uniform(-0.5, 0.5, 30 * A.HOP).astype(np.float32)
    for frames in (1, 2, 5, 7):
        short = rng.uniform(-0.5, 0.5, frames * A.HOP - 17).astype(np.float32)
        alone = A.encode_emb(model, [short])[0]
        batched = A.encode_emb(model, [short, long])[0]
        assert alone.shape == (frames, 128)
        torch.testing.assert_close(alone, batched, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- mel

def reference_log_mel(x):
    """Written out independently: explicit DFT matrix, Hann by formula, HTK mel triangles of peak
    1."""
    n_fft, hop, n_mels = 640, 320, 64
    T = math.ceil(len(x) / hop)
    win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    k = np.arange(n_fft // 2 + 1)
    dft = np.exp(-2j * np.pi * np.outer(k, np.arange(n_fft)) / n_fft)
    mel = lambda f: 2595 * np.log10(1 + f / 700)
    inv = lambda m: 700 * (10 ** (m / 2595) - 1)
    pts = inv(np.linspace(mel(0.0), mel(12000.0), n_mels + 2))
    freqs = k * SR / n_fft
    fb = np.zeros((n_mels, len(k)))
    for b in range(n_mels):
        lo, c, hi = pts[b], pts[b + 1], pts[b + 2]
        for i, f in enumerate(freqs):
            if lo < f <= c:
                fb[b, i] = (f - lo) / (c - lo)
            elif c < f < hi:
                fb[b, i] = (hi - f) / (hi - c)
    out = np.zeros((T, n_mels))
    for t in range(T):
        start = hop * t + hop // 2 - n_fft // 2      # frame t centred on sample 320 t + 160
        seg = np.array([x[s] if 0 <= s < len(x) else 0.0 for s in range(start, start + n_fft)])
        p = np.abs(dft @ (seg * win)) ** 2 * 4 / win.sum() ** 2
        out[t] = (np.log10(np.maximum(fb @ p, 1e-8)) + 4) / 4
    return out


def test_log_mel_matches_direct_dft_and_filterbank():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=3000) * 0.1 + sine(440, 3000 / SR)).astype(np.float32)
    np.testing.assert_allclose(A.log_mel(x), reference_log_mel(x), atol=1e-4)
    # torch in, torch out; batches work
    t = A.log_mel(torch.from_numpy(np.stack([x, x[::-1].copy()])))
    assert torch.is_tensor(t) and t.shape == (2, 10, 64)
    np.testing.assert_allclose(t[0].numpy(), A.log_mel(x), atol=1e-5)


@pytest.mark.parametrize("hz", [200.0, 1000.0, 3000.0, 8000.0])
def test_pure_tone_lands_in_its_mel_bin(hz):
    m = A.log_mel(sine(hz, 0.5, amp=1.0))
    mel = lambda f: 2595 * np.log10(1 + f / 700)
    centres = 700 * (10 ** (np.linspace(0, mel(12000.0), 66)[1:-1] / 2595) - 1)
    peak = np.argmax(m[10:-10].mean(0))
    assert abs(peak - np.argmin(np.abs(centres - hz))) <= 1
    assert 0.7 < m[10:-10].max() < 1.2               # full-scale sine ~0 dB -> ~1
    assert A.log_mel(np.zeros(3200, np.float32)).max() == -1.0


# ----------------------------------------------------------------------------- resampling

def peak_freq(x, sr):
    w = np.hanning(len(x))
    spec = np.abs(np.fft.rfft(x * w, 8 * len(x)))
    i = int(np.argmax(spec))
    a, b, c = np.log(spec[i - 1:i + 2] + 1e-12)     # parabolic interpolation of the peak
    return (i + 0.5 * (a - c) / (a - 2 * b + c)) * sr / (8 * len(x))


@pytest.mark.parametrize("sr_in", [8000, 16000, 22050, 44100, 48000])
def test_resampler_keeps_frequency_amplitude_and_length(sr_in):
    for hz in [440.0, 3150.0]:
        x = sine(hz, 0.7, sr=sr_in, amp=0.5)
        y = A.resample(x, sr_in, SR)
        assert len(y) == math.ceil(len(x) * SR / sr_in)
        mid = y[len(y) // 4: 3 * len(y) // 4]
        assert abs(peak_freq(mid, SR) - hz) < 0.5
        assert abs(np.abs(mid).max() - 0.5) < 0.01
        # sample n of the output is the input at time n / SR: compare against the analytic sine
        t = np.arange(len(y)) / SR
        ref = 0.5 * np.sin(2 * np.pi * hz * t)
        sl = slice(len(y) // 4, 3 * len(y) // 4)
        assert np.abs(y[sl] - ref[sl]).max() < 0.01
    assert np.array_equal(A.resample(x, sr_in, sr_in), x)


@pytest.mark.parametrize("sr_in", [8000, 16000, 22050, 44100])
def test_resampler_has_unit_dc_gain_in_every_phase(sr_in):
    """A constant resampled to 24 kHz is the same constant away from the edges (to float32
    rounding): each output phase's filter sums to 1. Filters normalised only on average leave a
    ripple at the phase period of ~4e-4 of the level, under the 1% the sine tests allow."""
    y = A.resample(np.full(sr_in // 4, 0.5, np.float32), sr_in, SR)
    assert np.abs(y[1000:-1000] - 0.5).max() < 1e-5


def test_resampler_removes_what_cannot_be_represented():
    # above the new Nyquist (12 kHz): must not alias to 9 kHz
    x = sine(15000.0, 0.5, sr=48000)
    y = A.resample(x, 48000, SR)
    assert np.abs(y[2000:-2000]).max() < 0.5 * 10 ** (-40 / 20)


def test_resampler_output_is_whole_across_its_chunks():
    """resample computes its output 16384 samples at a time: a 2 s tone resampled to 24 kHz
    (48000 samples, three chunks) is the analytic tone at every sample away from the ends, at the
    seams between chunks too."""
    y = A.resample(sine(440, 2.0, sr=16000), 16000, SR)
    ref = 0.5 * np.sin(2 * np.pi * 440 * np.arange(len(y)) / SR)
    assert len(y) == 2 * SR and np.abs(y[500:-500] - ref[500:-500]).max() < 0.01


@pytest.mark.parametrize("sr_in", [32000, 44100, 48000])
def test_resampler_passes_10_5_khz_and_stops_13_khz(sr_in):
    """The anti-alias filter's band edges on the way down to 24 kHz: a tone at 10.5 kHz keeps its
    amplitude within 1%, one at 13 kHz (which would fold to 11 kHz) is 60 dB down. A cutoff at the
    new Nyquist itself, or a shorter filter (a wider transition band), fails one or the other."""
    for hz, lo, hi in ((10500.0, 0.495, 0.505), (13000.0, 0.0, 0.5 * 10 ** (-60 / 20))):
        y = A.resample(sine(hz, 0.5, sr=sr_in), sr_in, SR)
        assert lo <= np.abs(y[2000:-2000]).max() <= hi, hz


def test_load_audio_takes_one_frame_and_stereo_and_refuses_what_is_no_clip(tmp_path):
    """check_audio's "shorter than one frame" is < 320 samples: exactly one frame is a clip, 319
    samples are not; load_audio downmixes a stereo file to the mean of its two channels (written
    as float at 24 kHz, so nothing is resampled), not to one of them; what is no clip (channels
    that cancel, silence, under a frame, a rate under 4 kHz, over MAX_CLIP_SECONDS, not audio) is
    refused in a line that says why, the bounds themselves taken."""
    x = (0.5 * np.sin(2 * np.pi * 440 * np.arange(320) / SR)).astype(np.float32)
    A.check_audio(x)
    with pytest.raises(A.BadAudio, match="shorter than one frame"):
        A.check_audio(x[:319])
    left, right = sine(440, 0.1), sine(1000, 0.1, amp=0.3)
    sf.write(tmp_path / "stereo.wav", np.stack([left, right], 1), SR, subtype="FLOAT")
    np.testing.assert_allclose(A.load_audio(tmp_path / "stereo.wav"), (left + right) / 2,
                               atol=1e-7)
    # channels that cancel in the mix: named as such, not as a silent file
    sf.write(tmp_path / "inverted.wav", np.stack([left, -left], 1), SR, subtype="FLOAT")
    with pytest.raises(A.BadAudio, match="channels that cancel when mixed to mono: 2 "):
        A.load_audio(tmp_path / "inverted.wav")
    # a silent stereo file is silent, not cancelling; every refusal names the file it read
    sf.write(tmp_path / "silent.wav", np.zeros((SR // 10, 2), np.float32), SR, subtype="FLOAT")
    with pytest.raises(A.BadAudio, match="all silent") as e:
        A.load_audio(tmp_path / "silent.wav")
    assert str(e.value).startswith(f"{tmp_path / 'silent.wav'}: ")
    sf.write(tmp_path / "short.wav", left[:100], SR, subtype="FLOAT")
    with pytest.raises(A.BadAudio, match="shorter than one frame") as e:
        A.load_audio(tmp_path / "short.wav")
    assert str(e.value).startswith(f"{tmp_path / 'short.wav'}: ")
    # a header's rate that is no audio rate (1 Hz: a second of samples would be read as 6.7 hours),
    # and a clip longer than the codec encodes in one piece: each named before any resampling
    sf.write(tmp_path / "rate1.wav", sine(440, 1.0), 1, subtype="FLOAT")
    with pytest.raises(A.BadAudio, match="not an audio rate: a sample rate of 1 Hz ") as e:
        A.load_audio(tmp_path / "rate1.wav")
    assert str(e.value).startswith(f"{tmp_path / 'rate1.wav'}: ")
    sf.write(tmp_path / "long.wav", np.full((A.MAX_CLIP_SECONDS + 1) * 4000, 0.1, np.float32), 4000,
             subtype="FLOAT")
    with pytest.raises(A.BadAudio, match=f"too long to encode: {A.MAX_CLIP_SECONDS + 1} s, over "
                                         f"the {A.MAX_CLIP_SECONDS} s a clip may last"):
        A.load_audio(tmp_path / "long.wav")
    # just over: its length to the hundredth ("120 s, over the 120 s" read as a mistake)
    sf.write(tmp_path / "over.wav", np.full(A.MAX_CLIP_SECONDS * 4000 + 40, 0.1, np.float32), 4000,
             subtype="FLOAT")
    with pytest.raises(A.BadAudio, match=f"too long to encode: {A.MAX_CLIP_SECONDS}.01 s, over "):
        A.load_audio(tmp_path / "over.wav")
    # audio that is not encoded (prepare.py --no_codes, a text model's --audio) has no limit
    assert len(A.load_audio(tmp_path / "long.wav", None)) == (A.MAX_CLIP_SECONDS + 1) * SR
    # the bounds themselves are in: a clip of exactly MAX_CLIP_SECONDS, a rate of 4 kHz (the
    # lowest audio rate taken; 3999 Hz is refused)
    sf.write(tmp_path / "edge.wav", np.full(A.MAX_CLIP_SECONDS * 4000, 0.1, np.float32), 4000,
             subtype="FLOAT")
    assert len(A.load_audio(tmp_path / "edge.wav")) == A.MAX_CLIP_SECONDS * SR
    sf.write(tmp_path / "rate_low.wav", sine(440, 1.0)[:3999], 3999, subtype="FLOAT")
    with pytest.raises(A.BadAudio, match="a sample rate of 3999 Hz"):
        A.load_audio(tmp_path / "rate_low.wav")
    # text named .mp3: libsndfile's own words would say the file does not exist
    (tmp_path / "fake.mp3").write_text("hi\n")
    with pytest.raises(A.BadAudio, match="unreadable or corrupt audio") as e:
        A.load_audio(tmp_path / "fake.mp3")
    assert "does not exist" not in str(e.value) and str(e.value).startswith(
        f"{tmp_path / 'fake.mp3'}: ")


def test_a_wav_cut_short_is_read_with_a_line_that_says_so(tmp_path, capsys):
    """A WAV file cut short (its data chunk declares more bytes than follow) is read as far as it
    goes, with a line naming the file and both sizes; a whole WAV, one with a chunk after its
    audio, a streamed WAV's placeholder size and a FLAC file read without one."""
    x = sine(440, 1.0)
    sf.write(tmp_path / "whole.wav", x, SR, subtype="PCM_16")
    whole = (tmp_path / "whole.wav").read_bytes()
    assert A.wav_data_bytes(tmp_path / "whole.wav") == (2 * SR, 2 * SR)
    (tmp_path / "cut.wav").write_bytes(whole[:44 + SR])  # the header, then half the audio
    got = A.load_audio(tmp_path / "cut.wav")
    np.testing.assert_allclose(got, A.load_audio(tmp_path / "whole.wav")[:SR // 2], atol=1e-4)
    err = capsys.readouterr().err
    assert err == (f"warning: {tmp_path / 'cut.wav'}: cut short? its header declares 48,000 bytes "
                   f"of audio, the file holds 24,000: reading the 0.50 s there are\n"), err
    # cut inside its first frame: refused in the one line of the refusal, no warning before it
    (tmp_path / "cut100.wav").write_bytes(whole[:100])
    with pytest.raises(A.BadAudio, match="shorter than one frame"):
        A.load_audio(tmp_path / "cut100.wav")
    assert capsys.readouterr().err == ""
    # a chunk after the audio (a LIST of tags), streamed placeholder sizes, FLAC: no line
    tail = b"LIST" + (6).to_bytes(4, "little") + b"INFOab"
    (tmp_path / "tagged.wav").write_bytes(whole[:4] + (len(whole) - 8 + len(tail)).to_bytes(
        4, "little") + whole[8:] + tail)
    assert A.wav_data_bytes(tmp_path / "tagged.wav") == (2 * SR, 2 * SR + len(tail))
    # a chunk of odd size before the audio: RIFF pads it with a byte the size does not count
    odd = b"junk" + (5).to_bytes(4, "little") + b"abcde\0"
    (tmp_path / "odd.wav").write_bytes(whole[:4] + (len(whole) - 8 + len(odd)).to_bytes(
        4, "little") + whole[8:36] + odd + whole[36:])
    assert A.wav_data_bytes(tmp_path / "odd.wav") == (2 * SR, 2 * SR)
    for placeholder in (0, 0xFFFFFFFF, 0x7FFFF000, 0x7FFFFFFF):  # sox writes 0x7ffff000
        streamed = bytearray(whole)
        streamed[40:44] = placeholder.to_bytes(4, "little")
        (tmp_path / "streamed.wav").write_bytes(bytes(streamed))
        assert A.wav_data_bytes(tmp_path / "streamed.wav") is None
    sf.write(tmp_path / "x.flac", x, SR)
    assert A.wav_data_bytes(tmp_path / "x.flac") is None
    for name in ("whole.wav", "tagged.wav", "streamed.wav", "x.flac"):
        assert len(A.load_audio(tmp_path / name)) == SR, name
    assert capsys.readouterr().err == ""


def test_check_audio_refuses_near_silence_and_integer_scaled_floats():
    """A clip whose peak is under 1e-4 (-80 dB, the mel's floor: a dithered or near-silent file) is
    "all silent", not only an all-zero one; a float clip peaking over 100 (integer-scaled samples,
    even a quiet one) is refused; just inside either bound is a clip."""
    tone = np.sin(2 * np.pi * 440 * np.arange(SR // 10) / SR).astype(np.float32)
    for peak in (5e-5, 1e-6):
        with pytest.raises(A.BadAudio, match="all silent"):
            A.check_audio(peak * tone)
    for peak in (150.0, 3000.0):
        with pytest.raises(A.BadAudio, match="peak amplitude over 100"):
            A.check_audio(peak * tone)
    for peak in (2e-4, 1.0, 90.0):
        A.check_audio(peak * tone)
    # the bound itself is in: a peak of exactly 100 is a clip ("over 100" is refused)
    A.check_audio(np.where(tone > 0, 100.0, -50.0).astype(np.float32))

# ----------------------------------------------------------------------------- the corpus

def test_synth_is_deterministic():
    for i in range(12):
        w1, a = Y.synth_clip(7, i, 3.0)
        w2, b = Y.synth_clip(7, i, 3.0)
        assert np.array_equal(w1, w2) and a["caption"] == b["caption"]
        assert w1.dtype == np.float32 and np.abs(w1).max() <= 1.0 and len(w1) <= 3.0 * SR + 1
    other = [Y.synth_clip(8, i, 3.0)[1]["caption"] for i in range(12)]
    assert other != [Y.synth_clip(7, i, 3.0)[1]["caption"] for i in range(12)]


def test_short_clips_keep_their_words_and_events_whole():
    """At --max_seconds=1 the silences around a sentence shrink instead of the sentence's end being
    cut (clips 131 and 151 of seed 1337 lost 0.2 s of their words, which the text still named),
    and a lone siren starts early enough to end inside the clip (every one lost its end)."""
    for i in (131, 151):
        wav, info = Y.synth_clip(1337, i, 1.0)
        assert info["kind"] == "speech" and len(wav) <= SR
        assert np.abs(wav[-200:]).max() < 0.02 * np.abs(wav).max(), i  # it ends in its decay
    sirens = [(info["onsets"][0], len(wav))
              for wav, info in (Y.synth_clip(1337, i, 1.0, kinds=["events"]) for i in range(30))
              if info["sequence"] == ["siren"]]
    assert sirens and all(onset + SR <= n for onset, n in sirens), sirens  # a siren lasts 1 s


def test_synth_kinds_keep_only_those_kinds_and_bad_kinds_are_named(tmp_path):
    kinds = ["dtmf", "morse"]
    got = [Y.synth_clip(7, i, 3.0, kinds=kinds)[1]["kind"] for i in range(40)]
    assert set(got) == set(kinds)            # both drawn, nothing else
    # the same proportions to each other as in the whole corpus (0.105 each): roughly half each
    assert 8 <= got.count("dtmf") <= 32
    with pytest.raises(SystemExit, match="unknown kind.*speach.*the corpus has"):
        P.check_args(P.get_args(["--kinds=speach,morse", f"--out_dir={tmp_path / 'x'}"]))
    with pytest.raises(SystemExit, match="--kinds is for --dataset=synth"):
        P.check_args(P.get_args(["--kinds=morse", "--dataset=folder", f"--src={tmp_path}",
                                 f"--out_dir={tmp_path / 'y'}"]))
    # so are the corpus's size, clip length, seed and speech: they would change nothing in a
    # folder's data, yet a plain re-run would be refused as one of other arguments
    with pytest.raises(SystemExit, match=r"error: --clips, --max_seconds, --seed, --no_speech are "
                                         r"for --dataset=synth \(the built-in corpus\), not "
                                         r"librispeech"):
        P.check_args(P.get_args(["--dataset=librispeech", f"--src={tmp_path}", "--clips=10",
                                 "--max_seconds=5", "--seed=3", "--no_speech",
                                 f"--out_dir={tmp_path / 'y'}"]))
    P.check_args(P.get_args(["--dataset=folder", f"--src={tmp_path}", "--clips=2000",
                             f"--out_dir={tmp_path / 'y'}"]))  # spelled as its default: no change
    # --src spelled with a trailing slash or ./ is the same folder to a re-run
    folder = [P.hash_args(P.get_args(["--dataset=folder", f"--src={src}"]))
              for src in ("mine", "mine/", "./mine", "mine//")]
    assert len(set(folder)) == 1 and folder[0] != P.hash_args(P.get_args(["--dataset=folder",
                                                                          "--src=yours"]))
    # data prepared before that, as "mine/", is still the same data to that command
    out = tmp_path / "prepared"
    out.mkdir()
    args = P.get_args(["--dataset=folder", "--src=mine/", f"--out_dir={out}"])
    old_hash = P.hash_args(args, src_as_given=True)
    assert old_hash != P.hash_args(args)
    (out / "meta.json").write_text(json.dumps({"args_hash": old_hash, "args": vars(args),
                                               "codec": None, "tokenizer": {}}))
    for split in ("train", "val"):
        for part in ("mel.bin", "clips.jsonl"):
            (out / f"{split}_{part}").write_text("")
    assert P.already_prepared(out, args, P.hash_args(args))
    # a corpus of other kinds is another corpus; the order they are named in does not matter
    assert P.hash_args(P.get_args(["--clips=10"])) != \
        P.hash_args(P.get_args(["--clips=10", "--kinds=morse"]))
    assert P.hash_args(P.get_args(["--clips=10", "--kinds=morse,dtmf"])) == \
        P.hash_args(P.get_args(["--clips=10", "--kinds=dtmf,morse"]))


def synth_of_kind(kind, n, max_dur=3.0):
    fn = dict((k, f) for k, _, f in Y.KIND_MIX)[kind]
    return [fn(np.random.default_rng([99, i]), max_dur) for i in range(n)]


def test_morse_transcript_decodes_back_from_the_audio():
    clips = synth_of_kind("morse", 25)
    assert len({info["transcript"] for _, info in clips}) > 10
    for wav, info in clips:
        assert C.read_morse(wav) == info["transcript"] == info["labels"]["word"]
    # a word of dashes only: the unit comes from the gaps inside a letter (from the marks alone,
    # every dash read as a dot: "to" came back as "h")
    env = Y.morse_envelope("to", 0.05)
    wav = np.zeros(len(env) + 4000, np.float32)
    wav[2000:2000 + len(env)] = 0.5 * env * np.sin(2 * np.pi * 600 * np.arange(len(env)) / SR)
    assert C.read_morse(wav) == "to"

def test_the_codec_readers_answer_nothing_for_silence_or_too_little():
    assert C.read_pitch(np.zeros(SR)) == 0.0 and C.read_note(np.zeros(SR)) == ""
    tone = np.sin(2 * np.pi * 440 * np.arange(SR) / SR)
    # read_note reads from sample 2000 on: 300 samples are under two periods of 60 Hz, YIN's floor
    assert C.read_note(tone) == "A4" and C.read_note(tone[:2300]) == ""

def test_codec_probes_without_speech_synthesise_none():
    """Where the speech library cannot load, prepare.py builds the corpus without speech, and the
    codec's report must not ask for it either."""
    probes = C.codec_probes(3, n_notes=1, n_morse=1, n_dtmf=1, n_any=6, speech=False)
    assert [info["kind"] != "speech" for _, info in probes["any"]] == [True] * 6
    with_speech = C.codec_probes(3, n_notes=1, n_morse=1, n_dtmf=1, n_any=6)
    assert any(info["kind"] == "speech" for _, info in with_speech["any"])


def count_onsets(x, min_gap=0.04):
    w = int(0.005 * SR)
    env = np.sqrt(np.convolve(x.astype(np.float64) ** 2, np.ones(w) / w, "same"))
    on = env > 0.1 * env.max()
    starts = np.flatnonzero(np.diff(on.astype(int)) == 1)
    merged = [s for k, s in enumerate(starts) if k == 0 or s - starts[k - 1] > min_gap * SR]
    return len(merged), merged


def test_event_counts_and_order_match_onsets():
    for wav, info in synth_of_kind("events", 60):
        n, starts = count_onsets(wav)
        assert n == len(info["sequence"]) == len(info["onsets"]), info["caption"]
        assert all(abs(s - o) < 0.01 * SR for s, o in zip(starts, info["onsets"]))
        if "order" not in info["labels"]:
            assert Y.NUMBER_WORDS[n] in info["caption"] or info["labels"]["event"] == "siren"
            assert info["qa"][0]["a"] == Y.NUMBER_WORDS[n]


def test_dtmf_digits_decode_back_from_the_audio():
    for wav, info in synth_of_kind("dtmf", 15):
        # Goertzel power at the 4 + 3 keypad frequencies, per burst
        digits = C.read_dtmf(wav)
        assert digits == info["labels"]["digits"]
        assert info["transcript"] == " ".join(Y.DTMF_WORDS[d] for d in digits)


def test_single_note_pitch_matches_label():
    seen = 0
    for wav, info in synth_of_kind("music", 80):
        if info["labels"]["form"] != "note" or info["labels"]["instrument"] == "bell":
            continue
        f = C.read_pitch(wav[2000: SR // 2])          # YIN, independent of how the note was made
        midi = 69 + 12 * np.log2(f / 440)
        # in tune (the plucked string included)
        assert abs(midi - round(midi)) < 0.25, (info["labels"], f)
        assert Y.midi_name(int(round(midi))) == info["labels"]["pitch"], (info["labels"], f)
        seen += 1
    assert seen >= 5


def test_plucked_string_is_tuned_within_half_a_sample_of_its_period():
    """Karplus-Strong's loop (a delay of p samples averaged with its neighbour) has a period of
    p - 1/2 samples, so with p chosen well every note's period is within half a sample of
    24000 / f: YIN's reading of each note from C3 to C5 is held to that (0.55 samples), tighter
    at the top of the range than the quarter semitone of test_single_note_pitch_matches_label."""
    for m in range(48, 73):
        hz = 440.0 * 2 ** ((m - 69) / 12)
        x = Y.tone("plucked string", hz, 0.5, np.random.default_rng(m))
        f = C.read_pitch(x[1000:9000])
        assert abs(SR / f - SR / hz) < 0.55, (m, SR / f, SR / hz)


def test_a_note_envelope_rises_then_fades_to_silence():
    """synth.envelope against its ramps written out: 10 ms up from 0, 1 in between, 50 ms down to 0;
    a note shorter than the release still ends at 0 (no click)."""
    a, r = int(0.01 * SR), int(0.05 * SR)
    env = Y.envelope(SR)
    assert env[0] == 0 and np.all(np.diff(env[:a]) > 0) and env[a - 1] == 1
    assert np.all(env[a:-r] == 1)
    assert np.all(np.diff(env[-r:]) < 0) and env[-1] == 0
    short = Y.envelope(100)
    assert short[0] == 0 and short[-1] == 0 and short.max() < 1

def test_a_mixture_is_its_music_at_0_6_under_its_events(monkeypatch):
    """make_mixture's audio is 0.6 x the music it describes plus the events it describes, both from
    the start: a mixture whose text names events its audio lacks would pass the other tests."""
    made = {}
    for name in ("make_music", "make_events"):
        orig = getattr(Y, name)
        monkeypatch.setattr(Y, name, lambda rng, d, orig=orig, name=name:
                            made.setdefault(name, orig(rng, d)))
    wav, info = Y.make_mixture(np.random.default_rng(3), 3.0)
    music, events = made["make_music"][0], made["make_events"][0]
    assert np.abs(music).max() > 0.1 and np.abs(events).max() > 0.1
    want = np.zeros(max(len(music), len(events)), np.float32)
    want[:len(music)] += 0.6 * music
    want[:len(events)] += events
    assert info["kind"] == "mixture" and wav.shape == want.shape
    assert np.allclose(wav, want, atol=1e-6)

def test_morse_envelope_follows_the_standard_timing():
    """morse_envelope against the rules written out: dot 1 unit, dash 3, 1 unit between the symbols
    of a letter, 3 between letters; "paris" (the word words-per-minute is defined by) is 43 units
    without its trailing 7-unit word gap, "sos" 27. read_morse tolerates a 2-unit letter gap, so
    only the mask itself shows one."""
    unit = 0.05
    u = int(unit * SR)
    for word in ["paris", "sos", "to", "ok", "e", "hello"]:
        env = Y.morse_envelope(word, unit)
        cells = env.reshape(-1, u)                   # whole units, each all on or all off
        assert (cells == cells[:, :1]).all() and set(np.unique(env)) <= {0.0, 1.0}
        bits = "".join(str(int(c)) for c in cells[:, 0])
        want = "000".join("0".join("1" if s == "." else "111" for s in Y.MORSE[ch])
                          for ch in word)
        assert bits == want, word
    assert len(Y.morse_envelope("paris", unit)) == 43 * u
    assert len(Y.morse_envelope("sos", unit)) == 27 * u


def test_morse_and_dtmf_answers_match_what_the_audio_reads():
    """The QA of Morse and DTMF clips against the readers' reading of the audio: the first letter
    and the number of letters of the word read from the envelope, and the number of keys read by
    Goertzel. Words and numbers with a repeated letter or key are among them, so a count of
    distinct ones would be caught."""
    repeated = 0
    for wav, info in synth_of_kind("morse", 40):
        word = C.read_morse(wav)
        qa = {q["q"]: q["a"] for q in info["qa"]}
        assert qa["what word is spelled in morse code?"] == word
        assert qa["what is the first letter?"] == word[0]
        assert qa["how many letters are sent?"] == Y.NUMBER_WORDS[len(word)]
        repeated += len(set(word)) < len(word)
    assert repeated >= 2
    repeated = 0
    for wav, info in synth_of_kind("dtmf", 30):
        digits = C.read_dtmf(wav)
        qa = {q["q"]: q["a"] for q in info["qa"]}
        assert qa["how many keys are pressed?"] == Y.NUMBER_WORDS[len(digits)]
        assert qa["what number is dialed?"] == " ".join(Y.DTMF_WORDS[d] for d in digits)
        repeated += len(set(digits)) < len(digits)
    assert repeated >= 2


def test_two_event_answers_and_labels_count_each_group():
    """Clips of two different events: which comes first and last, and how many of each, in the
    labels and the QA, against the sequence of sounds placed in the audio (as many as the onsets
    counted from the envelope); groups of unequal size are among them, so the first group's count
    cannot stand in for the second's."""
    unequal = 0
    for wav, info in synth_of_kind("events", 80):
        if "order" not in info["labels"]:
            continue
        seq = info["sequence"]
        first, last = seq[0], seq[-1]
        n1, n2 = seq.count(first), seq.count(last)
        assert first != last and n1 + n2 == len(seq) == count_onsets(wav)[0]
        assert seq == [first] * n1 + [last] * n2
        qa = {q["q"]: q["a"] for q in info["qa"]}
        assert qa["which sound comes first?"] == first and qa["which sound comes last?"] == last
        assert qa[f"how many {Y.EVENT_PLURAL[last]} are there?"] == Y.NUMBER_WORDS[n2]
        assert info["labels"]["count"] == str(n1) and info["labels"]["count_2"] == str(n2)
        assert info["labels"]["order"] == f"{first} then {last}"
        unequal += n1 != n2
    assert unequal >= 3


def test_interval_and_melody_labels_match_the_pitches_in_the_audio():
    """Intervals and melodies: the labelled (and asked) first note is the note YIN reads in the
    first note's span of the audio, and the direction asked is the one from that pitch to the last
    note's (a falling interval starts on its upper note, not on the root). Notes are named here
    from the MIDI number by hand; bells are left out (inharmonic)."""
    names = "C C# D D# E F F# G G# A A# B".split()
    read = lambda x: (lambda m: f"{names[m % 12]}{m // 12 - 1}")(
        int(round(69 + 12 * np.log2(C.read_pitch(x) / 440))))
    seen = {"up": 0, "down": 0}
    for wav, info in synth_of_kind("music", 120):
        if info["labels"]["form"] not in ("interval", "melody") or \
                info["labels"]["instrument"] == "bell":
            continue
        n = len(info["notes"])
        note_dur = (len(wav) / SR - 0.2) / n         # wav holds n notes and 0.2 s
        span = lambda j: wav[int((0.07 + j * note_dur) * SR):int((0.05 + (j + 1) * note_dur) * SR)]
        first = read(span(0))
        qa = {q["q"]: q["a"] for q in info["qa"]}
        assert info["labels"]["pitch"] == qa["what is the first note?"] == first, info["caption"]
        p0, p1 = C.read_pitch(span(0)), C.read_pitch(span(n - 1))
        assert qa["does the melody go up or down?"] == ("up" if p1 > p0 else "down")
        assert ("rising" in info["labels"]["melody"]) == (p1 > p0)
        seen[qa["does the melody go up or down?"]] += 1
    assert min(seen.values()) >= 3


def spectral_peaks(x, k, fmin=100.0):
    """The k strongest local maxima of x's Hann-windowed magnitude spectrum above fmin, in Hz
    (zero-padded 8 times, so a pure tone's peak lands within a fraction of a semitone)."""
    n = 8 * len(x)
    mag = np.abs(np.fft.rfft(x * np.hanning(len(x)), n))
    hz = np.fft.rfftfreq(n, 1 / SR)
    local = np.flatnonzero((mag[1:-1] > mag[:-2]) & (mag[1:-1] >= mag[2:])) + 1
    local = local[hz[local] > fmin]
    return sorted(hz[local[np.argsort(mag[local])[-k:]]])


def hz_midi(hz):
    return int(round(69 + 12 * np.log2(hz / 440)))


@pytest.mark.parametrize("hz", [400.0, 3000.0])
def test_square_and_sawtooth_have_their_harmonics_and_nothing_above_0_9_nyquist(hz):
    """A 1 s tone (whole periods, so each harmonic sits on one FFT bin): square holds the odd
    harmonics at 1/k of the fundamental and no even ones, sawtooth every harmonic at 1/k; neither
    holds anything off its harmonics or above 0.9 x Nyquist (it would alias into off-pitch
    partials)."""
    for instrument, odd_only in (("square", True), ("sawtooth", False)):
        x = Y.tone(instrument, hz, 1.0, np.random.default_rng(0))
        mag = np.abs(np.fft.rfft(x * np.hanning(len(x))))  # 1 Hz bins
        k_top = int(0.9 * SR / 2 // hz)
        harmonic = {k: mag[int(k * hz) - 2:int(k * hz) + 3].max() for k in range(1, k_top + 1)}
        for k in range(2, min(k_top, 7) + 1):
            if odd_only and k % 2 == 0:
                assert harmonic[k] < 0.01 * harmonic[1], (instrument, k)
            else:
                assert harmonic[k] / harmonic[1] == pytest.approx(1 / k, rel=0.1), (instrument, k)
        near = np.zeros(len(mag), bool)
        for k in range(1, int(SR / 2 // hz) + 1):
            near[max(0, int(k * hz) - 40):int(k * hz) + 41] = True  # the Hann window's skirt
        assert mag[~near].max() < 1e-3 * harmonic[1], instrument
        assert mag[int(0.9 * SR / 2) + 41:].max() < 1e-3 * harmonic[1], instrument


def test_chord_names_and_pitch_label_match_the_three_tones_in_the_audio():
    """A sine chord's three spectral peaks, named by hand from their frequencies: the lowest is the
    chord's root (its name and the pitch label), and the semitones from it to the others are the
    quality the name, the label and the answer say (major 4 and 7, minor 3 and 7, diminished 3 and
    6, augmented 4 and 8)."""
    names = "C C# D D# E F F# G G# A A# B".split()
    shapes = {(4, 7): "major", (3, 7): "minor", (3, 6): "diminished", (4, 8): "augmented"}
    seen = set()
    for i, root in enumerate(range(48, 73)):
        wav, notes, labels, caption, story, qa = Y.chord(np.random.default_rng([4, i]), 2.0,
                                                         "sine", "a sine tone", root)
        peaks = [hz_midi(f) for f in spectral_peaks(wav[SR // 10:-SR // 10], 3)]
        quality = shapes[(peaks[1] - peaks[0], peaks[2] - peaks[0])]
        name = f"{names[peaks[0] % 12]} {quality}"
        answers = {q["q"]: q["a"] for q in qa}
        assert labels["chord"] == answers["what chord is played?"] == name, (labels, peaks)
        assert answers["is the chord major or minor?"] == quality and name in caption
        assert labels["pitch"] == f"{names[peaks[0] % 12]}{peaks[0] // 12 - 1}", (labels, peaks)
        seen.add(quality)
    assert seen == set(shapes.values())


def test_interval_and_melody_names_match_the_steps_between_the_notes_in_the_audio():
    """Each note of a sine interval or melody read from its span of the audio (the spectral peak);
    the semitones from the first note are what the label names, written out here by hand: an
    interval's size, a major or minor scale (0 2 4 5 7 / 0 2 3 5 7) or arpeggio (0 4 7 12 /
    0 3 7 12), its first notes, reversed when falling."""
    sizes = {"minor third": 3, "major third": 4, "perfect fourth": 5, "perfect fifth": 7,
             "octave": 12}
    runs = {("major", "scale"): [0, 2, 4, 5, 7], ("minor", "scale"): [0, 2, 3, 5, 7],
            ("major", "arpeggio"): [0, 4, 7, 12], ("minor", "arpeggio"): [0, 3, 7, 12]}
    seen = set()
    for i in range(48):
        form = ["interval", "melody"][i % 2]
        wav, notes, labels, *_ = Y.note_sequence(np.random.default_rng([6, i]), 3.0, "sine",
                                                 "a sine tone", 48 + i % 25, form)
        n = len(notes)
        note_dur = (len(wav) / SR - 0.2) / n
        read = [hz_midi(spectral_peaks(wav[int((0.07 + j * note_dur) * SR):
                                           int((0.05 + (j + 1) * note_dur) * SR)], 1)[0])
                for j in range(n)]
        steps = [m - read[0] for m in read]
        words = labels["melody"].split()               # "rising perfect fifth", "falling C minor
        rising = words[0] == "rising"                  # scale"
        if form == "interval":
            want = [0, sizes[" ".join(words[1:])]]
        else:
            want = runs[(words[2], words[3])][:n]
            seen.add((words[2], words[3]))
        if not rising:
            want = [w - want[-1] for w in want[::-1]]
        assert steps == want, (labels, read)
    assert len(seen) == 4


def test_dtmf_tones_are_the_standard_keypad_pairs_and_spoken_by_name():
    """Each burst's two spectral peaks against the keypad's standard frequency grid, written out
    here (rows 697 770 852 941 Hz, columns 1209 1336 1477 Hz; keys 1 2 3 / 4 5 6 / 7 8 9 / * 0 #),
    not synth.py's tables that read_dtmf shares; the transcript speaks each key by its name."""
    rows, cols = [697, 770, 852, 941], [1209, 1336, 1477]
    pad = ["123", "456", "789", "*0#"]
    said = {**dict(zip("0123456789", "zero one two three four five six seven eight nine".split())),
            "*": "star", "#": "pound"}
    keys = ""
    for wav, info in synth_of_kind("dtmf", 12):
        digits = ""
        for on, a, b in C.envelope_runs(wav):
            if on:
                low, high = spectral_peaks(wav[a:b], 2, fmin=500)
                r = min(range(4), key=lambda i: abs(rows[i] - low))
                c = min(range(3), key=lambda i: abs(cols[i] - high))
                assert abs(rows[r] - low) < 20 and abs(cols[c] - high) < 20, (low, high)
                digits += pad[r][c]
        assert info["labels"]["digits"] == digits
        assert info["transcript"] == " ".join(said[d] for d in digits)
        keys += digits
    assert set(keys) == set("0123456789*#")


def test_morse_letters_are_sent_in_international_morse_code():
    """Every letter's marks in the envelope (one unit on for a dot, three for a dash) against
    International Morse Code written out here (ITU-R M.1677), not synth.py's table that read_morse
    shares."""
    itu = dict(zip("abcdefghijklmnopqrstuvwxyz",
                   ".- -... -.-. -.. . ..-. --. .... .. .--- -.- .-.. -- -. --- .--. --.- .-. "
                   "... - ..- ...- .-- -..- -.-- --..".split()))
    u = int(0.05 * SR)
    for ch, code in itu.items():
        cells = Y.morse_envelope(ch, 0.05)[::u]
        marks = "".join(cells.astype(int).astype(str)).split("0")
        assert "".join("." if m == "1" else "-" for m in marks) == code, ch

def test_dtmf_keys_are_on_the_standard_frequencies_exactly():
    """The keypad grid written out (rows 697 770 852 941 Hz, columns 1209 1336 1477 Hz; keys
    1 2 3 / 4 5 6 / 7 8 9 / * 0 #) against the two frequencies make_dtmf sums for each key, exactly:
    the audio test above reads them to the 20 Hz a decoder tolerates, which a table off by a few
    hertz would pass."""
    rows, cols = [697, 770, 852, 941], [1209, 1336, 1477]
    pad = ["123", "456", "789", "*0#"]
    want = {key: (rows[r], cols[c]) for r, keys in enumerate(pad) for c, key in enumerate(keys)}
    assert {k: (Y.DTMF_LOW[k], Y.DTMF_HIGH[k]) for k in Y.DTMF_KEYS} == want

def test_a_notes_frequency_is_its_midi_numbers_in_equal_temperament_to_a_few_cents():
    """A held sine note's spectral peak against 440 * 2 ** ((m - 69) / 12) Hz, to 3 cents (the
    pitch tests allow a quarter semitone, which a tuning off by 1% would pass)."""
    for i, root in enumerate(range(48, 73, 3)):
        wav, notes, *_ = Y.single_note(np.random.default_rng([5, i]), 2.0, "sine", "a sine tone",
                                       root)
        peak = spectral_peaks(wav[SR // 10:-SR // 10], 1)[0]
        want = 440 * 2 ** ((root - 69) / 12)
        assert abs(1200 * np.log2(peak / want)) < 3, (root, peak, want)

def test_a_mixtures_last_question_is_its_musics_note_chord_or_count():
    """A mixture asks about its instrument, the events and then the music's own question: the
    note, the chord or how many notes, answered as the labels and notes say."""
    forms = set()
    for wav, info in synth_of_kind("mixture", 30):
        q, a = info["qa"][-1]["q"], info["qa"][-1]["a"]
        if "chord" in info["labels"]:
            assert (q, a) == ("what chord is played?", info["labels"]["chord"]), info["qa"]
        elif "melody" in info["labels"]:
            assert (q, a) == ("how many notes are played?",
                              Y.NUMBER_WORDS[len(info["notes"])]), info["qa"]
        else:
            assert (q, a) == ("what note is played?", info["labels"]["pitch"]), info["qa"]
        forms.add(q)
    assert len(forms) == 3

def test_clips_of_neighbouring_seeds_are_not_the_same_clips_shifted():
    """Clip i of a seed is drawn from (seed, i): clip i + 1 of seed 1 is not clip i of seed 2
    (as with a generator seeded by seed + i), so corpora of two seeds share no clip."""
    for i in range(6):
        a, _ = Y.synth_clip(1, i + 1, 2.0, speech=False)
        b, _ = Y.synth_clip(2, i, 2.0, speech=False)
        assert len(a) != len(b) or not np.array_equal(a, b), i

def test_morse_description_names_the_tone_it_is_sent_on():
    for wav, info in synth_of_kind("morse", 12):
        hz = int(re.search(r"A steady (\d+) hertz tone", info["description"]).group(1))
        assert abs(spectral_peaks(wav, 1)[0] - hz) < 5, (info["description"], hz)


def test_morse_description_gives_the_speed_of_a_paris_word_in_its_units():
    """Words per minute by the PARIS standard: "paris" plus the 7-unit gap between words, timed
    with the clip's own unit through morse_envelope (50 units), fits that many times in 60 s."""
    for wav, info in synth_of_kind("morse", 12):
        wpm = int(re.search(r"at about (\d+) words per minute", info["description"]).group(1))
        word_s = len(Y.morse_envelope("paris", info["unit"])) / SR + 7 * info["unit"]
        assert abs(wpm - 60 / word_s) <= 0.6, (wpm, 60 / word_s)


def test_short_morse_and_dtmf_clips_are_padded_to_one_second_and_dtmf_text_counts_its_keys():
    for seed in range(3):
        for i in range(8):
            wav, info = Y.synth_clip(seed, i, 1.0, speech=False, kinds=["morse", "dtmf"])
            assert len(wav) == SR, (info["caption"], len(wav))
            if info["kind"] == "dtmf":
                k = Y.NUMBER_WORDS[len(info["labels"]["digits"])]
                assert f"Someone dials a phone: {k} keypad tones" in info["description"]
    # at a longer max_seconds, a clip is padded to one second only, not to max_seconds: its
    # length is that of its kind's maker (the same draws), or a second if that is shorter
    makers = {kind: fn for kind, _, fn in Y.KIND_MIX}
    for i in range(40):
        wav, info = Y.synth_clip(3, i, 3.0, speech=False)
        rng = np.random.default_rng([3, i])
        rng.random()  # synth_clip's draw of the kind
        made = makers[info["source"].split(":")[1]](rng, 3.0)[0]
        assert len(wav) == max(SR, len(made)), (info["caption"], len(wav), len(made))


def test_events_in_one_second_clips_are_as_many_as_the_text_says():
    """At --max_seconds=1 a sequence that does not fit loses its last events: the sequence, the
    caption and the count answer lose them too (the onsets counted from the envelope)."""
    dropped = 0
    for (wav, info), (_, drawn) in zip(synth_of_kind("events", 60, 1.0),
                                       synth_of_kind("events", 60, 3.0)):
        n = count_onsets(wav)[0]
        # the same draws at 3 s, where every drawn event fits
        dropped += len(drawn["sequence"]) > n
        assert n == len(info["sequence"]) == len(info["onsets"]), info["caption"]
        if "order" not in info["labels"] and info["labels"]["event"] != "siren":
            assert info["caption"].startswith(Y.NUMBER_WORDS[n] + " ")
            assert info["qa"][0]["a"] == Y.NUMBER_WORDS[n]
    assert dropped >= 2


def test_number_words_and_plurals():
    """number_words against English spelled by another rule (a table of the first twenty, then the
    tens with an optional unit) for every n the grammar says (0..99); plural on nouns of each
    English ending rule (-s, -x, -sh, -ch take -es) and on the grammar's own nouns."""
    small = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
             "fourteen fifteen sixteen seventeen eighteen nineteen").split()
    tens = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
    for n in range(100):
        want = small[n] if n < 20 else tens[n // 10] + (" " + small[n % 10] if n % 10 else "")
        assert Y.number_words(n) == want, n
    want = {"box": "boxes", "glass": "glasses", "brush": "brushes", "bench": "benches",
            "bus": "buses", "cup": "cups", "key": "keys", "kettle": "kettles", "watch": "watches"}
    assert {noun: Y.plural(noun) for noun in want} == want


def test_corpus_covers_the_kinds_and_text_depends_on_audio(synth_dir):
    clips = [json.loads(l) for s in ("train", "val")
             for l in Path(synth_dir, f"{s}_clips.jsonl").read_text().splitlines()]
    kinds = {c["kind"] for c in clips}
    assert kinds == {"music", "events", "morse", "dtmf", "mixture", "speech"}
    # about a quarter
    assert 0.15 < sum(c["kind"] == "speech" for c in clips) / len(clips) < 0.35
    assert len({c["caption"] for c in clips}) > 0.8 * len(clips)
    classes = {c["labels"]["class"] for c in clips}
    assert {"morse code", "dtmf tones", "plucked string", "beep", "speech"} <= classes
    for c in clips:
        assert c["caption"] and c["description"] and len(c["description"]) > len(c["caption"])
        assert c["qa"] and all(q["q"] and q["a"] for q in c["qa"])
        assert (c["transcript"] is not None) == (c["kind"] in ("morse", "dtmf", "speech"))
        if c["kind"] in ("music", "mixture"):
            assert "instrument" in c["labels"] and ("pitch" in c["labels"]
                                                    or "chord" in c["labels"])
        if c["kind"] in ("events", "mixture"):
            assert "event" in c["labels"] and "count" in c["labels"]
        if c["kind"] == "speech":
            assert c["labels"]["gender"] == Y.SPEAKERS[c["labels"]["speaker"]][1]


# ----------------------------------------------------------------------------- written files

def test_memmaps_jsonl_and_meta_round_trip(synth_dir):
    meta = json.loads(Path(synth_dir, "meta.json").read_text())
    assert meta["sample_rate"] == 24000 and meta["frame_rate"] == 75 and meta["hop_length"] == 320
    assert meta["n_q"] == 8 and meta["n_mels"] == 64 and meta["codebook_size"] == 1024
    assert meta["codec"]["pretrained"] is False and Path(synth_dir,
                                                         meta["codec"]["weights"]).is_file()
    # meta.json describes the corpus BPE stored with the data; the clips hold text, not tokens
    tok = T.load_tokenizer(synth_dir, "corpus")
    assert meta["tokenizer"]["name"] == "corpus" and Path(synth_dir,
                                                          meta["tokenizer"]["file"]).is_file()
    assert (tok.n_vocab == meta["tokenizer"]["vocab_size"]
            and tok.eot_token == meta["tokenizer"]["eot_token"])
    for split in ("train", "val"):
        codes = np.memmap(Path(synth_dir, f"{split}_codes.bin"), np.uint16, mode="r").reshape(-1, 8)
        mel = np.memmap(Path(synth_dir, f"{split}_mel.bin"), np.float16, mode="r").reshape(-1, 64)
        clips = [json.loads(l)
                 for l in Path(synth_dir, f"{split}_clips.jsonl").read_text().splitlines()]
        assert len(clips) == meta["splits"][split]["clips"] > 0
        assert (len(codes) == len(mel) == meta["splits"][split]["frames"]
                == sum(c["frames"] for c in clips))
        assert (codes.max() < 1024 and np.isfinite(mel).all()
                and -1.01 <= mel.min() and mel.max() < 2)
        offset = 0
        for c in clips:
            assert (c["offset"] == offset
                    and c["frames"] == math.ceil(round(c["duration"] * SR) / 320))
            offset += c["frames"]
            assert "tokens" not in c
            for k in ("caption", "transcript"):
                if c[k]:
                    assert tok.decode(tok.encode_ordinary(c[k])) == c[k]
    n_train, n_val = meta["splits"]["train"]["clips"], meta["splits"]["val"]["clips"]
    assert 0.05 < n_val / (n_train + n_val) < 0.2


def test_offline_tokenizer_round_trips_and_is_compact(synth_dir):
    tok = T.load_tokenizer(synth_dir)
    text = ("USER: <Speech><SpeechHere></Speech> Describe the audio.\n"
            "ASSISTANT: a plucked string plays a C major chord.")
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode(text)) < len(text) / 2.5
    # unseen text still round-trips (byte fallback)
    odd = "Ünïcødé ✓ 12345 tabs\tand\nnew lines"
    assert tok.decode(tok.encode(odd)) == odd
    ids = tok.encode("<|endoftext|>", allowed_special="all")
    assert ids == [tok.eot_token]


def test_train_bpe_learns_frequent_words():
    ranks = T.train_bpe(["the cat sat on the mat"] * 10 + ["the dog"], 400)
    assert len(ranks) > 256 and b" cat" in ranks and b"the" in ranks
    enc = T.make_encoding("t", ranks)
    assert len(enc.encode("the cat sat on the mat")) == 6


def test_output_files_name_everything_a_finished_run_wrote():
    """What already_prepared checks before skipping a run: the arrays and clip lists of both
    splits, Whisper's features when they were asked for, an offline codec's weights and a corpus
    tokenizer's file (a lost one makes the re-run rebuild)."""
    base = [f"{s}_{p}" for s in ("train", "val") for p in ("codes.bin", "mel.bin", "clips.jsonl")]
    assert sorted(P.output_files({"codec": {"pretrained": True}})) == sorted(base)
    assert sorted(P.output_files({"codec": None})) == sorted(f for f in base if "codes" not in f)
    meta = {"whisper_mel": {"n_mels": 80}, "codec": {"pretrained": False, "weights": "codec.pt"},
            "tokenizer": {"file": "tokenizer.tiktoken"}}
    assert sorted(P.output_files(meta)) == sorted(base + ["train_wmel.bin", "val_wmel.bin",
                                                          "codec.pt", "tokenizer.tiktoken"])

def naive_bpe(texts, vocab_size, min_count):
    """BPE that recounts every pair of every pre-token before each merge (train_bpe keeps the
    counts up to date instead): the most frequent pair, ties to the larger, merged left to right;
    stops below min_count."""
    import regex
    from collections import Counter
    words = Counter(w for t in texts for w in regex.findall(T.GPT2_PAT, t))
    seqs = {w: [bytes([b]) for b in w.encode("utf-8")] for w in words}
    ranks = {bytes([b]): b for b in range(256)}
    while len(ranks) < vocab_size:
        pairs = Counter()
        for w, s in seqs.items():
            for p in zip(s, s[1:]):
                pairs[p] += words[w]
        if not pairs:
            break
        (a, b), c = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        if c < min_count:
            break
        ranks.setdefault(a + b, len(ranks))
        for w, s in seqs.items():
            out, j = [], 0
            while j < len(s):
                if s[j:j + 2] == [a, b]:
                    out.append(a + b)
                    j += 2
                else:
                    out.append(s[j])
                    j += 1
            seqs[w] = out
    return ranks


def test_train_bpe_equals_naive_bpe():
    """The incremental pair counts give the merges, in order, of BPE recounted from scratch, down
    to pairs seen exactly min_count times (here "xy", twice)."""
    texts = ["the cat sat on the mat, the bat", "aaaa abab baba", "xy q", "xy z", "mat mat at"] * 2
    texts += ["one-off words 12345"]
    for min_count in (2, 3):
        assert T.train_bpe(texts, 330, min_count) == naive_bpe(texts, 330, min_count)
    assert b" xy" in T.train_bpe(["q xy", "z xy"], 300)  # seen twice: merged
    assert b" xy" not in T.train_bpe(["q xy"], 300)     # once: not


def test_train_bpe_stops_at_vocab_size_ranks():
    """vocab_size counts the 256 bytes and the merges: a corpus with pairs to spare gets exactly
    that many ranks, the first merges of the uncapped BPE."""
    texts = ["the cat sat on the mat, the bat", "aaaa abab baba", "mat mat at"] * 3
    full = naive_bpe(texts, 10_000, 2)
    assert len(full) > 270
    for size in (256, 257, 270):
        ranks = T.train_bpe(texts, size)
        assert len(ranks) == size
        assert ranks == {t: r for t, r in full.items() if r < size}


def test_parse_ranks_refuses_ranks_that_are_not_0_to_n_minus_1():
    """Stored BPE ranks must be 0..n-1 over at least the 256 bytes: a gap in the ranks, a rank
    given twice, or fewer than 256 tokens is named as corrupt; ranks_text -> parse_ranks is the
    identity on good ranks."""
    ranks = {**{bytes([b]): b for b in range(256)}, b"ab": 256}
    assert T.parse_ranks(T.ranks_text(ranks), "x") == ranks
    no_zero_byte = {**{bytes([b]): b for b in range(1, 256)}, b"ab": 0, b"cd": 256}
    for bad in ({**ranks, b"ab": 300}, {**ranks, b"ab": 255}, {bytes([b]): b for b in range(200)},
                no_zero_byte):  # tiktoken would panic on a byte without a rank
        with pytest.raises(ValueError, match="x: corrupt BPE ranks"):
            T.parse_ranks(T.ranks_text(bad), "x")


def test_ranks_that_are_not_text_are_named(tmp_path):
    """A ranks file that is not UTF-8 text, and a checkpoint's tokenizer record whose ranks are not
    text, are named (were a UnicodeDecodeError without the path, and an AttributeError)."""
    bad = tmp_path / "tokenizer.tiktoken"
    bad.write_bytes(b"\xff\xfe\x00junk")
    with pytest.raises(ValueError, match=f"{bad}: corrupt BPE ranks \\(not text\\)"):
        T.load_ranks(bad)
    with pytest.raises(ValueError, match="ckpt.pt: tokenizer record 'corpus' has no ranks"):
        T.tokenizer_from_record({"name": "corpus", "ranks": None}, "ckpt.pt")


# GPT-2's token ids as published (the GPT-2 vocabulary; "!" is rank 0, <|endoftext|> the last id)
GPT2_IDS = {"Hello world": [15496, 995], " the": [262], "!": [0],
            "Hello, world!": [15496, 11, 995, 0],
            "The quick brown fox jumps over the lazy dog.": [464, 2068, 7586, 21831, 18045, 625,
                                                             262, 16931, 3290, 13],
            # contractions are pre-tokens of their own; of two spaces, the first stands alone
            "I don't know": [40, 836, 470, 760], "they'll": [9930, 1183], "a  b": [64, 220, 275]}


def assert_is_gpt2(tok):
    assert tok.n_vocab == 50257 and tok.eot_token == 50256 and tok.name == "gpt2"
    for text, ids in GPT2_IDS.items():
        assert tok.encode(text) == ids, text
    assert tok.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert tok.encode_ordinary("<|endoftext|>") != [50256]  # as plain text it is just characters
    odd = "Ünïcødé ✓ 12345 tabs\tand\nnew lines"
    assert tok.decode(tok.encode(odd)) == odd


@pytest.fixture
def no_tiktoken_cache(tmp_path, monkeypatch):
    """An empty tiktoken cache; tiktoken's download fails the test if tried."""
    import tiktoken
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    def no_download(name):
        raise AssertionError(f"tiktoken.get_encoding({name!r}) called")
    monkeypatch.setattr(tiktoken, "get_encoding", no_download)
    return tmp_path / "tiktoken-cache"


def test_gpt2_bpe_offline_from_openai_whisper(no_tiktoken_cache, capsys, monkeypatch):
    """Offline, without tiktoken's files: the ranks openai-whisper ships give GPT-2's encoding,
    without importing whisper (pip install --no-deps openai-whisper is enough)."""
    monkeypatch.delitem(sys.modules, "whisper", raising=False)
    # the data dir plays no part for gpt2
    tok = T.load_tokenizer("no/such/dir", "gpt2", offline=True)
    assert "whisper" not in sys.modules
    assert_is_gpt2(tok)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "openai-whisper" in out[0] and "gpt2.tiktoken" in out[0]


def test_gpt2_bpe_download_failure_falls_back_in_one_line(no_tiktoken_cache, capsys, monkeypatch):
    import tiktoken
    def fail(name):
        raise ConnectionError("HTTPSConnectionPool(host='openaipublic.blob.core.windows.net'): Max "
                              "retries exceeded\n(Caused by NameResolutionError: Failed to resolve "
                              "'openaipublic.blob.core.windows.net')")
    monkeypatch.setattr(tiktoken, "get_encoding", fail)
    assert_is_gpt2(T.load_gpt2())
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 and "could not download" in out[0] and "no name resolution" in out[0]
    assert "openai-whisper" in out[1]


def test_gpt2_bpe_from_tiktoken_cache_and_corrupt_files(no_tiktoken_cache, capsys, monkeypatch):
    import hashlib
    import tiktoken
    cache = no_tiktoken_cache
    cache.mkdir()
    paths = [cache / hashlib.sha1(url.encode()).hexdigest() for url in T.GPT2_FILES]
    for p in paths:
        p.write_text("not GPT-2's file")
    # corrupt cached files: one line each, naming it, then the next source (offline:
    # openai-whisper's copy)
    assert_is_gpt2(T.load_gpt2(offline=True))
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 3 and all(str(p) in l and "corrupt" in l for p, l in zip(paths, out))
    assert "openai-whisper" in out[2]
    # intact cached files (here: files whose sha256 we declare) go to tiktoken, which reads its
    # cache
    monkeypatch.setattr(T, "GPT2_FILES", {u: hashlib.sha256(p.read_bytes()).hexdigest()
                                          for u, p in zip(T.GPT2_FILES, paths)})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: ("tiktoken's", name))
    assert T.load_gpt2(offline=True) == ("tiktoken's", "gpt2")
    assert "tiktoken's cache" in capsys.readouterr().out


def test_gpt2_bpe_missing_or_corrupt_whisper_copy_is_a_clear_error(no_tiktoken_cache, tmp_path,
                                                                   capsys, monkeypatch):
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_text("IQ== 0\n")
    monkeypatch.setattr(T, "whisper_gpt2_file", lambda: bad)
    with pytest.raises(RuntimeError, match="corrupt") as e:
        T.load_gpt2(offline=True)
    assert str(bad) in str(e.value) and "offline" in str(e.value)
    assert str(bad) in capsys.readouterr().out
    monkeypatch.setattr(T, "whisper_gpt2_file", lambda: None)
    with pytest.raises(RuntimeError, match="pip install --no-deps openai-whisper"):
        T.load_gpt2(offline=True)


def test_tokenizer_names_files_and_checkpoint_records(synth_dir, tmp_path):
    with pytest.raises(ValueError, match="tokenizer='gpt-2'.*corpus, gpt2"):
        T.load_tokenizer(synth_dir, "gpt-2")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "tokenizer.tiktoken")):
        T.load_tokenizer(tmp_path, "corpus")
    (tmp_path / "tokenizer.tiktoken").write_text("IQ== 0\nnot base64! 1\n")
    with pytest.raises(ValueError, match=f"{tmp_path / 'tokenizer.tiktoken'}.*corrupt"):
        T.load_tokenizer(tmp_path, "corpus")
    # a checkpoint's record of the corpus BPE holds its ranks: it rebuilds the same encoding without
    # the data dir
    tok = T.load_tokenizer(synth_dir, "corpus")
    rec = T.tokenizer_record(tok)
    assert rec["ranks"] == Path(synth_dir, "tokenizer.tiktoken").read_text()
    again = T.tokenizer_from_record(rec)
    text = "USER: <Speech><SpeechHere></Speech> Transcribe the audio.\nASSISTANT: sos<|endoftext|>"
    assert again.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")
    assert (again.n_vocab, again.eot_token, again.name) == (tok.n_vocab, tok.eot_token, "corpus")
    # GPT-2's is known by its name
    gpt2 = T.load_gpt2(offline=True)
    assert "ranks" not in T.tokenizer_record(gpt2)
    # a checkpoint without a record (older ones) gets the tokenizer its config names
    from types import SimpleNamespace
    assert T.checkpoint_tokenizer({"tokenizer": rec}, None, tmp_path).name == "corpus"
    old = T.checkpoint_tokenizer({}, SimpleNamespace(tokenizer="gpt2"), synth_dir)
    assert (old.name, old.n_vocab) == (gpt2.name, gpt2.n_vocab)
    old = T.checkpoint_tokenizer({}, SimpleNamespace(tokenizer="corpus"), synth_dir)
    assert (old.name, old.n_vocab) == ("corpus", tok.n_vocab)
    assert T.checkpoint_tokenizer({}, SimpleNamespace(), synth_dir) is None  # a model of codes


# ----------------------------------------------------------------------------- the offline codec

def test_offline_codec_codes_vary_and_depend_on_audio(synth_dir, codec):
    low, _ = A.features(sine(220, 1.0), codec)
    high, _ = A.features(sine(1760, 1.0), codec)
    noise, _ = A.features(np.random.default_rng(0).normal(0, 0.2, SR).astype(np.float32), codec)
    again, _ = A.features(sine(220, 1.0), codec)
    assert np.array_equal(low, again)
    mid = slice(10, -5)
    assert ((low[mid, 0] != high[mid, 0]).mean() > 0.9
            and (low[mid, 0] != noise[mid, 0]).mean() > 0.9)
    t = np.arange(SR) / SR
    sweep, _ = A.features((0.5 * np.sin(2 * np.pi * (100 * t + 2000 * t ** 2))).astype(np.float32),
                          codec)
    # a changing signal (100 Hz -> 4.1 kHz) gives changing codes
    assert len(np.unique(sweep[:, 0])) > 20
    codes = np.memmap(Path(synth_dir, "train_codes.bin"), np.uint16, mode="r").reshape(-1, 8)
    for q in range(6):
        # the codebooks are fitted and used (the deepest ones fit a residual that this small
        # corpus's sample leaves near zero, so they are not checked)
        assert len(np.unique(codes[:, q])) > 300
    # the saved codec decodes (sample.py relies on it)
    with torch.no_grad():
        wav = codec.decoder(codec.quantizer.decode(torch.from_numpy(low[:15]).T[:, None]))
    assert wav.shape[-1] == 320 * 15 and torch.isfinite(wav).all()


# -----------------------------------------------------------------------------
# real data and bad input

FAST = ["--quiet", "--kmeans_frames=512", "--kmeans_iters=2", "--offline", "--codec_steps=2",
        "--codec_clips=4", "--codec_tune_steps=1", "--codec_report=0"]


def write_folder(d):
    d.mkdir()
    sf.write(d / "good1.wav", sine(440, 0.5, sr=16000), 16000)
    sf.write(d / "good2.flac", np.stack([sine(660, 0.6, sr=44100), sine(660, 0.6, sr=44100)], 1),
             44100)
    (d / "sub").mkdir()
    sf.write(d / "sub" / "good3.wav", sine(880, 0.4), SR)
    sf.write(d / "good4.opus", sine(440, 0.5, sr=48000), 48000, format="OGG", subtype="OPUS")
    (d / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk" * 4)
    sf.write(d / "empty.wav", np.zeros(0, np.float32), SR)
    sf.write(d / "silent.wav", np.zeros(SR // 2, np.float32), SR)
    nan = sine(440, 0.3)
    nan[100] = np.nan
    sf.write(d / "nan.wav", nan, SR, subtype="FLOAT")
    sf.write(d / "short.wav", sine(440, 100 / SR), SR)
    sf.write(d / "loud.wav", sine(440, 0.3) * 1e6, SR, subtype="FLOAT")  # finite, far over 1
    (d / "notes.txt").write_text("not audio")
    # as a spreadsheet saves "CSV UTF-8": a byte-order mark first; a path written "./sub/..."
    (d / "manifest.csv").write_text("\ufefffile,caption,label,question,answer\n"
                                    "good1.wav,a tone at 440 hertz,tone,what pitch?,A4\n"
                                    "good2.flac,a higher tone,tone,,\n"
                                    "./sub/good3.wav,a tone in a folder,,,\n"
                                    "missing.wav,gone,tone,,\n", encoding="utf-8")


def test_a_folder_of_other_files_is_not_written_into(tmp_path):
    """--out_dir naming a folder that holds other files (no meta.json, no stopped run's work) stops
    before any work, naming some of them, and leaves them as they were; --force writes there."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.tmp2.txt").write_text("mine")  # a name the staged files' cleanup matched
    (out / "train_mel.bin").write_bytes(b"mine")
    args = ["--clips=4", "--max_seconds=1.0", f"--out_dir={out}"] + FAST
    with pytest.raises(SystemExit, match=f"--out_dir={out}: holds 2 file\\(s\\) that are not "
                                         f"prepared data \\(notes.tmp2.txt, train_mel.bin\\)"):
        P.main(args)
    assert (out / "notes.tmp2.txt").read_text() == "mine" and sorted(
        p.name for p in out.iterdir()) == ["notes.tmp2.txt", "train_mel.bin"]
    (out / "train_mel.bin.tmp4242").write_bytes(b"half")  # a crashed run's staged file: removed
    (out / "codec.png.tmp4242.tmp.png").write_bytes(b"half")  # and its picture's, half-drawn
    P.main(args + ["--force"])
    assert not (out / "train_mel.bin.tmp4242").exists()
    assert not (out / "codec.png.tmp4242.tmp.png").exists()
    assert (out / "meta.json").exists() and (out / "train_mel.bin").read_bytes() != b"mine"
    assert (out / "notes.tmp2.txt").read_text() == "mine"  # not a staged file: not removed


def test_offline_codec_options_given_with_the_pretrained_encodec_are_said_to_be_unused(
        tmp_path, monkeypatch, capsys):
    """The options that fit the offline codec do nothing when the pretrained EnCodec is found: a
    note names those given (none when only defaults)."""
    fake = tmp_path / "encodec_24khz-d7cc33bc.th"
    monkeypatch.setattr(P, "get_pretrained_codec", lambda *a, **k: ("a codec", fake))
    args = P.get_args(["--codec_steps=50", "--kmeans_iters=3", f"--out_dir={tmp_path}"])
    assert P.get_codec(args, tmp_path)[1]["pretrained"] is True
    out = capsys.readouterr().out
    assert "note: --codec_steps, --kmeans_iters fit the offline codec" in out, out
    P.get_codec(P.get_args([f"--out_dir={tmp_path}"]), tmp_path)
    assert "note:" not in capsys.readouterr().out


def test_a_manifest_csv_with_an_unclosed_quote_is_named_not_read_wrongly(tmp_path):
    """An unclosed quote in manifest.csv swallowed the rows after it into one caption, silently:
    now a one-line error with the file and the line."""
    (tmp_path / "manifest.csv").write_text('file,caption\nd0.wav,"a dog barks\nd1.wav,a cat\n')
    with pytest.raises(SystemExit,
                       match=f"error: {tmp_path / 'manifest.csv'}: not CSV after line 1"):
        P.read_manifest(tmp_path, lambda *a: None)


def test_a_manifest_csv_row_with_an_unquoted_comma_is_reported_not_shifted(tmp_path):
    """An unquoted comma in a caption gave the row one field more than its header: the caption was
    cut there, its tail became the label (and the answer to "what sound is this?"), silently. The
    row is reported and skipped; the rows around it are read."""
    (tmp_path / "manifest.csv").write_text("file,caption,label\n"
                                           "a.wav,a dog barks, then a car passes,dog\n"
                                           "b.wav,\"rain, then thunder\",rain\n"
                                           "c.wav,a bell,bell,,\n")  # a trailing comma or two
    problems = []
    rows = P.read_manifest(tmp_path, lambda where, why, kept=False: problems.append((where, why)))
    assert problems == [(f"{tmp_path}/manifest.csv:2", "manifest row has more fields than its "
                                                       "header (3): quote a field that holds a "
                                                       "comma")]
    assert [(r["name"], r["caption"], r["label"]) for r in rows.values()] == [
        ("b.wav", "rain, then thunder", "rain"), ("c.wav", "a bell", "bell")]
    # an empty manifest.csv names no file: no rows, as before (its header is not checked)
    (tmp_path / "manifest.csv").write_text("")
    assert P.read_manifest(tmp_path, lambda *a, **k: pytest.fail(f"reported {a}")) == {}


def test_a_manifest_that_is_not_utf8_or_has_no_file_column_stops_in_one_line(tmp_path):
    """A Latin-1 manifest (a spreadsheet's plain "CSV") was read with replacement characters: its
    captions wrong and its accented file names missing, silently. A header without a file column
    (a semicolon-separated sheet, a file without a header line) named no file in any row. Either
    stops the run with one line, as an unclosed quote does: every row's text would be wrong."""
    (tmp_path / "manifest.csv").write_bytes("file,caption\nb.wav,rain\ncafé.wav,naïve tone\n"
                                            .encode("latin-1"))
    with pytest.raises(SystemExit, match=re.escape(f"error: {tmp_path / 'manifest.csv'}: not UTF-8 "
                                                   f"(line 3); save it as UTF-8")):
        P.read_manifest(tmp_path, lambda *a, **k: None)
    (tmp_path / "manifest.csv").write_text("file;caption\na.wav;a dog\n")
    with pytest.raises(SystemExit, match="its first line 'file;caption' names no file column"):
        P.read_manifest(tmp_path, lambda *a, **k: None)
    (tmp_path / "manifest.jsonl").write_bytes(b'{"file": "a.wav", "caption": "\xe9t\xe9"}\n')
    with pytest.raises(SystemExit, match="manifest.jsonl: not UTF-8 \\(line 1\\)"):
        P.read_manifest(tmp_path, lambda *a, **k: None)
    # UTF-8 with a spreadsheet's byte-order mark reads as it is
    (tmp_path / "manifest.jsonl").unlink()
    (tmp_path / "manifest.csv").write_bytes("file,caption\ncafé.wav,naïve tone\n"
                                            .encode("utf-8-sig"))
    rows = P.read_manifest(tmp_path, lambda *a, **k: pytest.fail(f"reported {a}"))
    assert [r["caption"] for r in rows.values()] == ["naïve tone"]


def test_a_manifest_name_in_another_unicode_form_finds_its_file(tmp_path):
    """"é" composed (NFC, as typed) and decomposed (NFD, as macOS writes file names) are one name
    to a reader, two to the file system: the manifest's row reaches its file either way. A Windows
    path that names no file is told to use /."""
    nfc, nfd = "caf\u00e9.wav", "cafe\u0301.wav"
    for disk, manifest in ((nfd, nfc), (nfc, nfd)):
        src = tmp_path / f"{len(disk)}"
        (src / "sub").mkdir(parents=True)
        sf.write(src / disk, sine(440, 0.1), SR)
        sf.write(src / "sub" / "a.wav", sine(440, 0.1), SR)
        (src / "manifest.jsonl").write_text(
            json.dumps({"file": manifest, "caption": "a tone"}) + "\n"
            + json.dumps({"file": "sub\\a.wav", "caption": "another"}) + "\n")
        problems = []
        items = P.folder_items(src, lambda where, why, kept=False: problems.append((where, why)))
        assert {it["id"]: it["caption"] for it in items} == {disk: "a tone", "sub/a.wav": None}
        assert problems == [(f"{src}/sub\\a.wav", "named in the manifest but the file is missing "
                                                   "(write its path with /)")], problems


def test_hidden_files_are_left_out_and_fields_of_spaces_are_no_text(tmp_path):
    """macOS leaves .DS_Store and a ._ copy beside each file it touched, git a .git folder: none
    is an input (each was reported as a bad one, the ._ copies as corrupt audio). A manifest field
    of spaces gave an empty caption, and a question of spaces a question-answer pair; a list of
    labels read as Python's "['beep', 'tone']"."""
    (tmp_path / ".git").mkdir()
    for name in ("a.wav", "._a.wav", ".git/b.wav"):
        sf.write(tmp_path / name, sine(440, 0.1), SR)
    (tmp_path / ".DS_Store").write_bytes(b"\0Bud1")
    (tmp_path / "manifest.jsonl").write_text(
        json.dumps({"file": "a.wav", "caption": "   ", "question": " ", "answer": "yes",
                    "qa": [{"q": "loud? ", "a": " no"}, {"q": "  ", "a": "x"}]}) + "\n"
        + json.dumps({"file": "a.wav", "caption": " a tone ", "label": ["beep", "tone"]}) + "\n")
    reported = []
    items = P.folder_items(tmp_path, lambda where, why, kept=False: reported.append((why, kept)))
    assert [(it["id"], it["caption"], it["qa"]) for it in items] == [
        ("a.wav", "a tone", [{"q": "loud?", "a": "no"}, {"q": "what sound is this?",
                                                          "a": "beep, tone"}])]
    # the answers whose question is spaces: half a pair each, said and left out (the clip kept)
    assert reported == [("manifest row has an answer but no question; the pair is ignored", True),
                        ("a 'qa' entry {\"q\": \"  \", \"a\": \"x\"} lacks a \"q\" or an \"a\"; it "
                         "is ignored", True)]
    # a hidden file the manifest names is said to be left out, not dropped without a word
    with open(tmp_path / "manifest.jsonl", "a") as f:
        f.write(json.dumps({"file": ".git/b.wav", "caption": "x"}) + "\n")
    problems = []  # (after the two half pairs said above)
    P.folder_items(tmp_path, lambda where, why, kept=False: problems.append((where, why)))
    assert problems[2:] == [(str(tmp_path / ".git" / "b.wav"), "hidden (a name starting with .), "
                             "not read, though the manifest names it")]


def test_a_clotho_style_manifest_gives_its_first_caption_and_unread_columns_are_named(tmp_path,
                                                                                      capsys):
    """Clotho's captions CSV (file_name, caption_1..caption_5): the first caption is the clip's.
    A column prepare.py does not read (here "text") is named once, not dropped without a word."""
    (tmp_path / "manifest.csv").write_text("file_name,caption_1,caption_2,text\n"
                                           "a.wav,a dog barks,a dog,x\nb.wav,,rain falls,y\n")
    rows = P.read_manifest(tmp_path, lambda *a: None)
    assert [rows[(tmp_path / f).resolve()]["caption"] for f in ("a.wav", "b.wav")] == [
        "a dog barks", "rain falls"]
    out = capsys.readouterr().out
    assert out.count("not read") == 1 and "'text'" in out and "caption_2" not in out, out


def test_repeated_manifest_rows_for_one_file_merge_and_keep_the_first_text(tmp_path):
    """Rows naming the same file (also spelled another way) are one clip: of each text field the
    first non-empty value is kept, fields only a later row gives are added, and the question-answer
    pairs of every row are kept in order."""
    rows = [{"file": "a.wav", "caption": "a dog barks", "question": "what animal?",
             "answer": "dog"},
            {"file": "./a.wav", "caption": "a loud dog", "transcript": "woof",
             "qa": [{"q": "how many barks?", "a": "two"}]},
            {"file": "a.wav", "caption": "", "label": "dog"}]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = P.read_manifest(tmp_path, lambda *a, **k: pytest.fail(f"reported {a}"))
    assert list(out) == [(tmp_path / "a.wav").resolve()]
    r = out[(tmp_path / "a.wav").resolve()]
    assert (r["caption"], r["transcript"], r["label"]) == ("a dog barks", "woof", "dog")
    assert r["qa"] == [{"q": "what animal?", "a": "dog"}, {"q": "how many barks?", "a": "two"}]


def test_a_stopped_run_of_other_arguments_is_announced_before_it_is_replaced(tmp_path, capsys):
    """A folder holding the encoded chunks of a stopped run with other arguments: a run with new
    ones says it starts anew (it used to remove them without a word), and removes them at its
    end."""
    src, out = tmp_path / "src", tmp_path / "out"
    write_folder(src)
    stale = out / ".work-0123abcd-offline"
    stale.mkdir(parents=True)
    np.savez(stale / "chunk0000.npz", x=np.zeros(1))
    codec_only = out / ".work-4567ef01-offline"  # stopped while training the offline codec
    codec_only.mkdir()
    (codec_only / "codec_train.pt").write_bytes(b"")
    P.main(["--dataset=folder", f"--src={src}", f"--out_dir={out}", "--val_percent=0"] + FAST)
    assert ("also holds 2 stopped run(s) of other arguments or another codec "
            "(.work-0123abcd-offline, .work-4567ef01-offline); this run starts anew"
            ) in capsys.readouterr().out
    assert not stale.exists() and not codec_only.exists() and (out / "meta.json").is_file()


def test_a_ctrl_c_while_espeak_speaks_stops_it():
    """A Ctrl-C while espeak speaks mostly lands in its ctypes callback, where ctypes printed the
    KeyboardInterrupt and dropped it: speak() returned a clip cut short and the run went on. Now
    speak() raises it. A real SIGINT, in a process of its own (a stray one would stop pytest)."""
    import subprocess
    code = ("import os, signal, threading, synth\n"
            # as in a terminal, also where this test runs as a background job (SIGINT ignored)
            "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "text = 'the quick brown fox jumps over the lazy dog. ' * 40\n"
            "synth.speak('warm up', 'en-us+Andy')  # loading espeak is not speaking\n"
            "threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()\n"
            "try:\n"
            "    print('returned', len(synth.speak(text, 'en-us+Andy')))\n"
            "except KeyboardInterrupt:\n"
            "    print('raised')\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                       capture_output=True, text=True, timeout=120)
    assert p.stdout.strip() == "raised" and "Exception ignored" not in p.stderr, (p.stdout,
                                                                                    p.stderr)


def test_an_exception_in_espeaks_callback_stops_it(monkeypatch):
    """Any exception raised in the callback (here from reading a block) stops espeak at once and is
    raised by speak(), not printed and dropped by ctypes."""
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        raise KeyboardInterrupt
    monkeypatch.setattr(Y.np.ctypeslib, "as_array", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Y.speak("check eighty grey tables", "en-us+Andy")
    assert len(calls) == 1  # espeak stopped at the first block


BAD = {"corrupt.wav": "unreadable or corrupt", "empty.wav": "zero-length",
       "silent.wav": "all silent",
       "nan.wav": "NaN", "short.wav": "shorter than one frame", "notes.txt": "not an audio file",
       "loud.wav": "peak amplitude over 100 (5e+05, where full scale is 1",
       "missing.wav": "named in the manifest but the file is missing"}


def test_skipped_inputs_are_counted_by_kind_of_problem(tmp_path, capsys):
    """The summary counts kinds of problem: two files too long, at other lengths, or at two rates
    too low, are one kind each (the figures of each file are in its own line, not in the key)."""
    problems = P.InputProblems(strict=False)
    for i, n in enumerate((130, 125)):
        path = tmp_path / f"long{i}.wav"
        sf.write(path, np.full(n * 4000, 0.1, np.float32), 4000, subtype="FLOAT")
        with pytest.raises(A.BadAudio) as e:
            A.load_audio(path)
        problems(str(path), e.value.reason)
    for rate in (3000, 2000):
        path = tmp_path / f"rate{rate}.wav"
        sf.write(path, np.full(rate, 0.1, np.float32), rate, subtype="FLOAT")
        with pytest.raises(A.BadAudio) as e:
            A.load_audio(path)
        problems(str(path), e.value.reason)
    assert problems.counts == {"too long to encode": 2, "not an audio rate": 2}
    lines = capsys.readouterr().out
    assert (f"skipping {tmp_path / 'long0.wav'}: too long to encode: 130 s" in lines
            and f"skipping {tmp_path / 'rate2000.wav'}: not an audio rate: a sample rate of "
                f"2000 Hz" in lines), lines


def test_folder_dataset_reports_each_bad_input_and_keeps_the_good(tmp_path, capsys, monkeypatch):
    src, out = tmp_path / "src", tmp_path / "out"
    write_folder(src)
    args = ["--dataset=folder", f"--src={src}", f"--out_dir={out}", "--val_percent=0"] + FAST
    P.main(args)
    log, err = capsys.readouterr()
    # four short files fit 1024-entry codebooks poorly: said, with the way out
    assert "frames are few for 1024-entry codebooks" in err and "--codec_from" in err
    lines = log.splitlines()
    for name, problem in BAD.items():
        assert any(name in l and problem in l for l in lines), (name, log)
    assert "skipped 8 inputs" in log and "audio-seconds per second" in log
    clips = [json.loads(l) for l in (out / "train_clips.jsonl").read_text().splitlines()]
    assert sorted(c["id"] for c in clips) == ["good1.wav", "good2.flac", "good4.opus",
                                              "sub/good3.wav"]
    by = {c["id"]: c for c in clips}
    assert (by["good1.wav"]["caption"] == "a tone at 440 hertz"
            and by["good1.wav"]["labels"]["class"] == "tone")
    assert {"q": "what pitch?", "a": "A4"} in by["good1.wav"]["qa"]
    assert by["sub/good3.wav"]["labels"]["class"] == "sub"
    assert by["sub/good3.wav"]["caption"] == "a tone in a folder"
    assert np.isfinite(np.fromfile(out / "train_mel.bin", dtype=np.float16)).all()
    # 44.1 kHz stereo -> 24 kHz mono, same length in time
    assert abs(by["good2.flac"]["duration"] - 0.6) < 1e-3
    meta = json.loads((out / "meta.json").read_text())
    assert sum(meta["skipped"].values()) == 8
    # the summary counts kinds of problem, not files: no measured value or file name in its keys
    assert set(meta["skipped"]) == {
        "named in the manifest but the file is missing", "not an audio file",
        "unreadable or corrupt audio", "zero-length audio", "peak amplitude over 100",
        "contains NaN or infinite samples", "shorter than one frame", "all silent"}
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    # same arguments again: finished work is skipped, nothing rewritten
    P.main(args)
    log = capsys.readouterr().out
    assert "already prepared" in log and "files under --src are not compared" in log
    # an output file deleted: the same command rebuilds the same bytes
    (out / "train_mel.bin").unlink()
    P.main(args)
    assert "lacks train_mel.bin: rebuilding" in capsys.readouterr().out
    # meta.json spoilt: the data's arguments are unknown, so nothing is rebuilt without --force
    # (other arguments would replace the data and its codec); with it, the same bytes
    for spoilt in ("{", "[]"):
        (out / "meta.json").write_text(spoilt)
        with pytest.raises(SystemExit) as e:
            P.main(args + ["--vocab_size=300"])
        assert "cannot be read as prepare.py's JSON" in str(e.value) and "--force" in str(e.value)
        assert (out / "meta.json").read_text() == spoilt
    P.main(args + ["--force"])
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # --strict stops at the first bad input, naming it, and what was written stays intact
    with pytest.raises(SystemExit) as e:
        P.main(["--dataset=folder", f"--src={src}", f"--out_dir={out}", "--strict",
                "--force"] + FAST)
    assert "--strict" in str(e.value) and any(n in str(e.value) for n in BAD)
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before
    # a rebuild that fails half way (here: while training the tokenizer) leaves the old output
    # complete
    def crash(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(P, "train_bpe", crash)
    with pytest.raises(RuntimeError):
        P.main(args + ["--force"])
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and ".tmp" not in p.name}
    assert after == before


def test_folder_with_nothing_usable_ends_in_one_line(tmp_path, monkeypatch):
    """An empty folder, and one whose only audio is bad, end before the codec trains (which needs
    clips); the empty one before any codec is set up (with a network, EnCodec's download); with
    --strict the first bad file is named."""
    empty, bad = tmp_path / "empty", tmp_path / "bad"
    empty.mkdir()
    bad.mkdir()
    sf.write(bad / "silent.wav", np.zeros(SR // 2, np.float32), SR)
    (bad / "notes.txt").write_text("not audio")
    codecs = []
    get_codec = P.get_codec
    monkeypatch.setattr(P, "get_codec", lambda *a: codecs.append(a) or get_codec(*a))
    for src, extra, said in ((empty, [], "no audio files to prepare (skipped 0 inputs)"),
                             (bad, [], "no usable clips (skipped 2 inputs)"),
                             (bad, ["--strict"], f"{bad / 'notes.txt'}: not an audio file")):
        with pytest.raises(SystemExit) as e:
            P.main(["--dataset=folder", f"--src={src}", f"--out_dir={tmp_path / 'out'}",
                    *extra] + FAST)
        assert said in str(e.value), (src, extra, str(e.value))
        if src == empty:
            assert not codecs
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as e:
        P.main(["--dataset=folder", f"--src={bad}", f"--out_dir={tmp_path / 'a_file'}"] + FAST)
    assert "a file is in the way of that folder" in str(e.value)
    (bad / "notes.txt").unlink()
    with pytest.raises(SystemExit) as e:  # the strict stop comes from the codec's reading ahead
        P.main(["--dataset=folder", f"--src={bad}", f"--out_dir={tmp_path / 'out'}",
                "--strict"] + FAST)
    assert f"{bad / 'silent.wav'}: all silent" in str(e.value), str(e.value)


def test_a_run_that_writes_nothing_leaves_no_folder_behind(tmp_path, synth_dir):
    """A run that stops before any output (no pretrained weights in --codec_dir, a --src with no
    audio, only bad audio, with or without --codec_from's codec copied in, a --strict stop while
    reading) makes no output folder, nor its parents; a folder that was there already stays,
    without a work directory in it."""
    empty, bad, kept = tmp_path / "empty", tmp_path / "bad", tmp_path / "kept"
    for d in (empty, bad, kept):
        d.mkdir()
    sf.write(bad / "silent.wav", np.zeros(SR // 2, np.float32), SR)
    out = tmp_path / "new" / "out"
    # --codec_from takes its codec as it is: no fitting settings beside it
    from_synth = [f"--codec_from={synth_dir}"] + [a for a in FAST if not a.startswith("--codec")]
    for args, said in (
            ([f"--codec_dir={tmp_path / 'nonexistent'}", "--clips=2"] + FAST,
             f"--codec_dir={tmp_path / 'nonexistent'}: no encodec_24khz"),
            (["--dataset=folder", f"--src={empty}"] + FAST, "no audio files to prepare"),
            (["--dataset=folder", f"--src={bad}"] + FAST, "no usable clips"),
            (["--dataset=folder", f"--src={bad}"] + from_synth, "no usable clips"),
            (["--dataset=folder", f"--src={bad}", "--strict"] + FAST,
             f"{bad / 'silent.wav'}: all silent")):
        with pytest.raises(SystemExit) as e:  # each stopped where it should, not by a check before
            P.main(args + [f"--out_dir={out}"])
        assert said in str(e.value), (args, e.value)
        assert not (tmp_path / "new").exists(), args
    for extra in (FAST, from_synth):
        with pytest.raises(SystemExit, match="no usable clips"):
            P.main(["--dataset=folder", f"--src={bad}", f"--out_dir={kept}"] + extra)
        assert kept.is_dir() and not list(kept.iterdir()), extra


def test_the_offline_codec_says_what_it_is_doing_unless_quiet(tmp_path, capsys,
                                                               monkeypatch):
    """k-means shows a bar over the codebooks (none with quiet), and the held-out report says what
    it measures, and on how many clips, before its wait; its summary comes after."""
    model = A.offline_codec().eval()
    C.dct_init(model)
    emb = torch.randn(600, 128)
    C.fit_codebooks(model, emb, iters=1, quiet=True)
    assert capsys.readouterr().err == ""
    C.fit_codebooks(model, emb, iters=1)
    assert "fit codebooks: 100%" in capsys.readouterr().err
    asked = []  # the speech= each call of codec_probes was given
    monkeypatch.setattr(P, "codec_probes", lambda seed, speech: asked.append(speech) or
                        C.codec_probes(seed, n_notes=2, n_morse=1, n_dtmf=1, n_any=2, max_dur=1.0,
                                       speech=False))
    P.report_offline_codec(model, 1337, P.Staging(tmp_path), speech=False)
    assert asked == [False]  # no speech library: the probes ask for no speech either
    out = capsys.readouterr().out
    said = out.find("measuring decode(encode(x)) on 6 held-out clips (2 notes read for pitch")
    assert 0 <= said < out.index("offline codec on held-out clips"), out


def test_manifest_rows_of_the_wrong_shape_are_reported_not_fatal(tmp_path):
    (tmp_path / "a.wav").write_bytes(b"")
    (tmp_path / "manifest.jsonl").write_text(
        '["a.wav"]\n{"file": 7}\n{"file": "a.wav", "qa": 5, "caption": "kept"}\n{bad json\n')
    problems = []
    rows = P.read_manifest(tmp_path, lambda where, why, kept=False: problems.append((where, why,
                                                                                     kept)))
    assert [r["caption"] for r in rows.values()] == ["kept"]
    # the row with a bad 'qa' is kept: a warning, not a skipped input
    assert [kept for _, _, kept in problems] == [False, False, False, True]
    problems = [(where, why) for where, why, _ in problems]
    whys = [why for _, why in problems]
    assert [w.split(" (")[0] for w in whys] == [
        "bad JSON line", "manifest row is not an object", "manifest row has no 'file' field",
        "'qa' is not a list of question-answer objects"], whys
    assert whys[3].endswith("the row's 'qa' ignored")
    assert [where.rsplit(":", 1)[1] for where, _ in problems] == ["4", "1", "2", "3"]


def test_folder_items_with_a_transcript_are_speech_and_a_label_is_asked_about(tmp_path):
    """A folder file whose manifest row gives a transcript is kind "speech" (so --kinds=speech and
    the speech subsets find it), others kind "file"; a label becomes the class and the answer to
    "what sound is this?", after the row's own questions."""
    for name in ("said.wav", "dog.wav", "plain.wav"):
        sf.write(tmp_path / name, sine(440, 0.1), SR)
    (tmp_path / "manifest.jsonl").write_text(
        json.dumps({"file": "said.wav", "transcript": "hello there"}) + "\n"
        + json.dumps({"file": "dog.wav", "label": "dog", "question": "loud?", "answer": "yes"})
        + "\n")
    items = {it["id"]: it for it in P.folder_items(tmp_path, lambda *a, **k: None)}
    assert {i: it["kind"] for i, it in items.items()} == {"said.wav": "speech", "dog.wav": "file",
                                                           "plain.wav": "file"}
    assert items["said.wav"]["transcript"] == "hello there" and items["said.wav"]["qa"] == []
    assert items["dog.wav"]["labels"] == {"class": "dog"}
    assert items["dog.wav"]["qa"] == [{"q": "loud?", "a": "yes"},
                                      {"q": "what sound is this?", "a": "dog"}]
    assert items["plain.wav"]["labels"] == {"class": "sound"} and items["plain.wav"]["qa"] == []


def test_librispeech_layout_and_missing_transcripts(tmp_path, capsys):
    src = tmp_path / "LibriSpeech" / "dev-clean" / "84" / "121123"
    src.mkdir(parents=True)
    sf.write(src / "84-121123-0000.flac", sine(300, 0.5, sr=16000), 16000)
    sf.write(src / "84-121123-0001.flac", sine(500, 0.4, sr=16000), 16000)
    sf.write(src / "84-121123-0002.flac", sine(700, 0.4, sr=16000), 16000)   # no transcript line
    (src / "84-121123.trans.txt").write_text("84-121123-0000 GO DO YOU HEAR\n84-121123-0001 WHAT "
                                             "IS IT\n84-121123-0009 THIS ONE HAS NO AUDIO\n")
    out = tmp_path / "out"
    P.main(["--dataset=librispeech", f"--src={tmp_path / 'LibriSpeech'}", f"--out_dir={out}",
            "--val_percent=0"] + FAST)
    log = capsys.readouterr().out
    assert any("84-121123-0002.flac" in l and "missing transcript" in l for l in log.splitlines())
    assert any("84-121123-0009.flac" in l and "missing" in l for l in log.splitlines())
    clips = [json.loads(l) for l in (out / "train_clips.jsonl").read_text().splitlines()]
    assert [c["transcript"] for c in clips] == ["go do you hear", "what is it"]
    assert all(c["kind"] == "speech" and c["labels"]["speaker"] == "84" for c in clips)
    assert "tokens" not in clips[0]
    tok = T.load_tokenizer(out, "corpus")
    assert tok.decode(tok.encode(clips[0]["transcript"])) == "go do you hear"


def test_librispeech_files_with_a_transcript_line_are_not_reported(tmp_path):
    """Only the files without a transcript line and the lines without a file are reported (each
    report is a skipped input in the summary and in meta.json); the transcribed files are items."""
    d = tmp_path / "19" / "198"
    d.mkdir(parents=True)
    for k in range(3):
        sf.write(d / f"19-198-000{k}.flac", sine(300, 0.1, sr=16000), 16000)
    (d / "19-198.trans.txt").write_text("19-198-0000 HELLO\n19-198-0001 GOOD BYE\n"
                                        "19-198-0007 NO FILE\n")
    problems = []
    items = P.librispeech_items(tmp_path, lambda what, why: problems.append((Path(what).name, why)))
    assert [it["transcript"] for it in items] == ["hello", "good bye"]
    assert sorted(problems) == [
        ("19-198-0002.flac", "missing transcript (no line in any .trans.txt)"),
        ("19-198-0007.flac", "missing file, listed in a transcript (19-198.trans.txt)")]

def test_librispeech_transcripts_as_editors_and_broken_downloads_leave_them(tmp_path):
    """A byte-order mark before the first ID (it became part of the ID: the clip was reported
    twice and lost), a tab after an ID (read as part of it), runs of spaces, an ID listed twice (two
    clips of one id), a transcript file that is not UTF-8 (read with replacement characters) and
    one that cannot be read (a traceback): each clip read right, or one line."""
    d, e = tmp_path / "19" / "198", tmp_path / "20" / "300"
    d.mkdir(parents=True)
    e.mkdir(parents=True)
    for k in range(4):
        sf.write(d / f"19-198-000{k}.flac", sine(300, 0.1, sr=16000), 16000)
    for k in range(2):
        sf.write(e / f"20-300-000{k}.flac", sine(300, 0.1, sr=16000), 16000)
    (d / "19-198.trans.txt").write_bytes("19-198-0000 HELLO\r\n19-198-0001\tGOOD   BYE \r\n"
                                         "19-198-0002 CAFÉ AU LAIT\r\n19-198-0001 AGAIN\r\n"
                                         "19-198-0003 LAST\r\n".encode("utf-8-sig"))
    (e / "20-300.trans.txt").write_bytes("20-300-0000 CAFÉ\n20-300-0001 X\n".encode("latin-1"))
    (tmp_path / "21-400.trans.txt").symlink_to(tmp_path / "nowhere")  # a link to nothing
    problems = []
    items = P.librispeech_items(tmp_path, lambda what, why, kept=False: problems.append(
        (Path(what).name, why, kept)))
    assert [(it["id"], it["transcript"]) for it in items] == [
        ("19-198-0000", "hello"), ("19-198-0001", "good bye"), ("19-198-0002", "café au lait"),
        ("19-198-0003", "last")]
    assert problems == [
        ("19-198-0001.flac", "listed again in a transcript (19-198.trans.txt); the first line is "
                             "kept", True),
        ("20-300.trans.txt", "not UTF-8: a transcript file, its clips skipped", False),
        ("21-400.trans.txt", "unreadable (No such file or directory): a transcript file, its clips "
                             "skipped", False)], problems

def test_interrupted_run_resumes_from_saved_chunks(tmp_path, capsys, monkeypatch):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    rng = np.random.default_rng(0)
    # noisy, so no two frames are near-identical codewords
    for k, hz in enumerate([300, 500, 700]):
        sf.write(src / f"tone{k}.wav",
                 sine(hz, 0.5) + rng.normal(0, 0.05, SR // 2).astype(np.float32), SR)
    args = ["--dataset=folder", f"--src={src}", f"--out_dir={out}", "--val_percent=0"] + FAST

    def crash(*a, **k):
        raise KeyboardInterrupt
    # stop after the audio is encoded, before anything is written
    monkeypatch.setattr(P, "fit_codebooks", crash)
    with pytest.raises(KeyboardInterrupt):
        P.main(args)
    assert not (out / "meta.json").exists() and list(out.glob(".work-*/chunk*.npz"))
    monkeypatch.undo()
    # settings that pass 1's encodings do not depend on may change (e.g. a smaller batch after
    # running out of memory): the chunks are used all the same, and the codes stored are those the
    # finished codec gives (below)
    P.main(args + ["--batch_seconds=0.5", "--kmeans_iters=3", "--vocab_size=300",
                   "--codec_tune_steps=2"])
    assert "resuming: 3 clips already encoded" in capsys.readouterr().out
    clips = [json.loads(l) for l in (out / "train_clips.jsonl").read_text().splitlines()]
    assert [c["id"] for c in clips] == ["tone0.wav", "tone1.wav", "tone2.wav"]
    assert not list(out.glob(".work-*"))
    codes = np.memmap(out / "train_codes.bin", np.uint16, mode="r").reshape(-1, 8)
    k, _ = A.features(A.load_audio(src / "tone1.wav"), A.load_codec(out))
    stored = codes[clips[1]["offset"]:clips[1]["offset"] + clips[1]["frames"]]
    assert np.array_equal(k, stored)


def test_resume_ignores_a_chunk_whose_write_was_not_finished(tmp_path):
    """A kill while a chunk is written leaves chunkNNNNN.tmp.npz (whole or cut short) beside the
    finished chunks: resuming reads the finished ones only, so no clip comes twice and a cut file
    stops nothing."""
    clip = lambda i: ({"id": f"c{i}", "duration": 0.1}, np.full((i + 1, 128), i, np.float32),
                      np.full((i + 1, 64), i, np.float16), None)
    P.save_chunk(tmp_path, 0, [clip(0), clip(1)], False)
    P.save_chunk(tmp_path, 1, [clip(2)], False)
    shutil.copyfile(tmp_path / "chunk00001.npz", tmp_path / "chunk00002.tmp.npz")  # not renamed
    (tmp_path / "chunk00003.tmp.npz").write_bytes(b"PK\x03\x04 cut")                # cut short
    done, n = P.load_chunks(tmp_path, False)
    assert n == 2 and [info["id"] for info, *_ in done] == ["c0", "c1", "c2"]
    for i, (info, emb, mel, wmel) in enumerate(done):
        assert emb.shape == (i + 1, 128) and (emb == i).all() and (mel == i).all() and wmel is None


def clip_rows(data_dir, part="codes"):
    """{clip id: (its rows of {split}_{part}.bin, its clip record)} over both splits of a prepared
    corpus (part: codes or mel)."""
    dtype, width = {"codes": (np.uint16, 8), "mel": (np.float16, 64)}[part]
    out = {}
    for split in ("train", "val"):
        rows = np.memmap(Path(data_dir, f"{split}_{part}.bin"), dtype, mode="r").reshape(-1, width)
        for line in Path(data_dir, f"{split}_clips.jsonl").read_text().splitlines():
            c = json.loads(line)
            out[c["id"]] = (np.array(rows[c["offset"]:c["offset"] + c["frames"]]), c)
    return out

def clip_codes(data_dir):
    """{clip id: its codes} over both splits of a prepared corpus."""
    return {i: codes for i, (codes, _) in clip_rows(data_dir).items()}

def test_codec_from_gives_another_corpus_the_same_codes(synth_dir, tmp_path, capsys):
    """--codec_from takes a prepared corpus's codec as it is: the same clips get the very codes
    they have there, the codec's identity is the source's, a re-run skips, and after the source's
    codec changed a re-run says so and keeps the data, which --force rebuilds."""
    src, out = tmp_path / "src", tmp_path / "out"
    shutil.copytree(synth_dir, src)
    # the fixture's first clips (a synth clip depends only on the seed and its index)
    args = ["--clips=12", "--max_seconds=2.0", "--quiet", "--offline", "--codec_report=0",
            f"--out_dir={out}", f"--codec_from={src}"]
    P.main(args)
    theirs, ours = clip_codes(src), clip_codes(out)
    assert len(ours) == 12 and all(np.array_equal(ours[i], theirs[i]) for i in ours)
    assert (out / "codec.pt").read_bytes() == (src / "codec.pt").read_bytes()
    assert A.codec_id(out) == A.codec_id(src)
    assert json.loads((out / "meta.json").read_text())["codec"]["from"] == str(src)
    capsys.readouterr()
    # a kill between the data's last rename and the work folder's removal left the work behind:
    # the re-run that finds the data finished removes it (another run's work stays)
    h = json.loads((out / "meta.json").read_text())["args_hash"]
    for name, owner in ((".work-left-x", h), (".work-other-x", "another run")):
        (out / name).mkdir()
        (out / name / "args_hash").write_text(owner)
    P.main(args)
    assert "already prepared" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob(".work-*")) == [".work-other-x"]
    shutil.rmtree(out / ".work-other-x")
    # another codec at the source (a codeword moved): the output is stale and is rebuilt
    ck = torch.load(src / "codec.pt", weights_only=True)
    key = next(k for k in ck["model"] if k.endswith("_codebook.embed"))
    ck["model"][key][0] += 1.0
    torch.save(ck, src / "codec.pt")
    assert A.codec_id(out) != A.codec_id(src)
    with pytest.raises(SystemExit, match=f"the codec at --codec_from={src} has changed since"):
        P.main(args)
    assert clip_codes(out).keys() == ours.keys()
    P.main(args + ["--force"])
    assert A.codec_id(out) == A.codec_id(src)
    # codec_id's cache of the hash is per file version: a codec written over in place with the
    # same size (a re-fit) gets its new id in the same process
    again = tmp_path / "resaved"
    again.mkdir()
    shutil.copy(src / "meta.json", again / "meta.json")
    torch.save(ck, again / "codec.pt")
    before, size = A.codec_id(again), (again / "codec.pt").stat().st_size
    ck["model"][key][0] += 1.0
    torch.save(ck, again / "codec.pt")
    assert (again / "codec.pt").stat().st_size == size and A.codec_id(again) != before

def test_no_codes_stores_the_same_mel_and_text_and_no_codes(synth_dir, tmp_path, capsys):
    """--no_codes: the same clips get the very mel and text they have in a corpus with codes, no
    codes are written, a re-run skips, sample.py reads a clip's mel, and a reader of the codes is
    refused in one line."""
    out = tmp_path / "out"
    args = ["--clips=12", "--max_seconds=2.0", "--quiet", "--offline", "--codec_report=0",
            f"--out_dir={out}", "--no_codes"]
    P.main(args)
    theirs, ours = clip_rows(synth_dir, "mel"), clip_rows(out, "mel")
    assert len(ours) == 12
    for i, (mel, rec) in ours.items():
        assert np.array_equal(mel, theirs[i][0])
        assert {k: rec[k] for k in ("transcript", "caption", "qa", "labels", "frames")} == \
            {k: theirs[i][1][k] for k in ("transcript", "caption", "qa", "labels", "frames")}
    assert not list(out.glob("*codes*")) and not (out / "codec.pt").exists()
    assert json.loads((out / "meta.json").read_text())["codec"] is None
    capsys.readouterr()
    P.main(args)
    assert "already prepared" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no codes"):
        A.codec_id(out)
    with pytest.raises(ValueError, match="no codes"):
        A.load_codec(out)
    import sample as S                                # sample.py --clip reads such data too
    clip, rec = S.read_clip(out, "train", 0)
    assert "codes" not in clip and np.array_equal(clip["mel"].numpy(), ours[rec["id"]][0])
    for extra in (["--codec_from=" + str(synth_dir)], ["--codebook0_mel"], ["--codec_steps=5"]):
        with pytest.raises(SystemExit) as e:
            P.main(args + extra)
        assert ("--no_codes stores no codes" in str(e.value)
                and extra[0].split("=")[0] in str(e.value))

@pytest.mark.parametrize("extra, says", [
    ([], "meta.json: missing"),
    (["--codec_steps=5"], "--codec_steps would make another one"),
    (["--offline_codec"], "--offline_codec would make another one"),
    (["--codec_tune_steps=3"], "--codec_tune_steps would make another one")])
def test_codec_from_bad_input_is_one_line(tmp_path, extra, says):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        P.main(["--clips=4", "--quiet", "--offline", f"--out_dir={tmp_path / 'out'}",
                f"--codec_from={tmp_path / 'empty'}"] + extra)
    assert says in str(e.value) and "--codec_from=" in str(e.value)

def test_offline_codec_with_codec_dir_is_one_line(tmp_path):
    with pytest.raises(SystemExit) as e:
        P.main(["--clips=4", "--quiet", "--offline_codec", f"--codec_dir={tmp_path}",
                f"--out_dir={tmp_path / 'out'}"])
    assert str(e.value).startswith(f"error: --offline_codec fits a codec of its own: "
                                   f"--codec_dir={tmp_path}")
    assert not (tmp_path / "out").exists()

def test_codec_trains_and_tunes_on_train_clips_only(tmp_path, monkeypatch):
    """--codec_steps / --codec_tune_steps: the clips the codec learns from are the first
    --codec_clips of the train split (is_val decides, as for the splits), never val clips."""
    seen = []
    monkeypatch.setattr(P, "train_codec", lambda codec, wavs, *a, **k: seen.extend(wavs))
    infos = [{"id": f"clip{i:03d}"} for i in range(200)]
    clips = lambda: ((np.full(10, i, np.float32), info) for i, info in enumerate(infos))
    args = P.get_args(["--codec_steps=5", "--codec_clips=50", "--val_percent=30", "--quiet"])
    got = P.start_offline_codec(None, clips, P.InputProblems(False), args, tmp_path)
    train_ids = [info["id"] for info in infos if not P.is_val(info["id"], 30)]
    assert list(got) == train_ids[:50] and len(seen) == 50
    assert [int(w[0]) for w in seen] == [int(i[4:]) for i in train_ids[:50]]
    # --codec_tune_steps alone: the decoder is tuned on the same train clips
    args = P.get_args(["--codec_tune_steps=3", "--codec_clips=50", "--val_percent=30", "--quiet"])
    assert list(P.start_offline_codec(None, clips, P.InputProblems(False), args,
                                      tmp_path)) == train_ids[:50]

@pytest.mark.parametrize("arg", ["--clips=0", "--max_seconds=0.5", "--val_percent=250",
                                 "--kmeans_frames=0", "--kmeans_iters=0", "--codec_steps=-3",
                                 "--codec_tune_steps=-1", "--codec_clips=0", "--codec_report=-1",
                                 "--batch_seconds=0", "--batch_seconds=inf", "--seed=-1",
                                 "--max_seconds=inf",
                                 # the split is drawn per mille: 0.05 would give 0.1
                                 "--val_percent=0.05"])
def test_numbers_out_of_range_are_named_before_any_work(tmp_path, arg):
    with pytest.raises(SystemExit) as e:
        P.main(["--quiet", "--offline", f"--out_dir={tmp_path / 'out'}", arg])
    assert str(e.value).startswith(f"error: {arg}: must be")
    assert not (tmp_path / "out").exists()

@pytest.mark.parametrize("arg,shown", [("--max_seconds=121", "121"),
                                       ("--max_seconds=1e9", "1e\\+09")])
def test_a_max_seconds_longer_than_a_clip_may_last_is_refused(arg, shown):
    # a clip is made and encoded whole: 1e9 ended in a traceback for 22 TiB, 121 s encodes ~2 GB
    with pytest.raises(SystemExit, match=f"error: --max_seconds={shown}: must be 1 to "
                                         f"{A.MAX_CLIP_SECONDS}"):
        P.check_args(P.get_args([arg]))

def test_an_abbreviated_option_is_refused_not_taken_for_the_longer_one(tmp_path, capsys):
    # argparse's default would read --clip=20 as --clips=20 and --offline_c as --offline_codec
    for arg in ("--clip=20", "--offline_c"):
        with pytest.raises(SystemExit):
            P.main(["--quiet", f"--out_dir={tmp_path / 'out'}", arg])
        assert f"unrecognized arguments: {arg}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert P.get_args(["--clips=20"]).clips == 20

def test_the_work_directory_is_named_by_what_the_encodings_depend_on():
    """Pass 1's chunks are kept across settings that change only what comes after them (and the
    finished data's hash still tells those settings apart)."""
    base = P.get_args([])
    for after in ("--batch_seconds=4", "--kmeans_frames=99", "--kmeans_iters=3", "--vocab_size=900",
                  "--codec_tune_steps=7", "--codec_report=0", "--offline"):
        args = P.get_args([after])
        assert P.work_hash(args) == P.work_hash(base), after
        assert P.hash_args(args) != P.hash_args(base), after
    for before in ("--seed=3", "--clips=7", "--max_seconds=2", "--codec_steps=5", "--whisper_mel",
                   "--kinds=note"):
        assert P.work_hash(P.get_args([before])) != P.work_hash(base), before


def test_the_work_directory_changes_with_the_clips_the_codec_trains_on():
    """With --codec_steps, pass 1 encodes with a codec trained on the train split's first
    --codec_clips clips: another --val_percent or --codec_clips trains another codec, so its chunks
    are not resumed."""
    base = P.get_args(["--codec_steps=5"])
    for other in ("--val_percent=30", "--codec_clips=9"):
        assert P.work_hash(P.get_args(["--codec_steps=5", other])) != P.work_hash(base), other


def test_the_default_place_named_as_such_is_the_same_run():
    """--name / --out_dir naming the default place hash as the default (a re-run skips); another
    name is another run."""
    default = P.hash_args(P.get_args([]))
    assert P.hash_args(P.get_args(["--name=synth", "--out_dir=data/synth/"])) == default
    assert P.hash_args(P.get_args(["--name=synth"])) == default      # either one alone too
    assert P.hash_args(P.get_args(["--out_dir=data/synth"])) == default
    assert P.hash_args(P.get_args(["--name=other"])) != default

def test_out_dir_spelled_as_the_named_default_is_the_same_run():
    """--out_dir=data/NAME beside --name=NAME is NAME's default place: the same hash as --name=NAME
    alone; another out_dir is another run."""
    named = P.hash_args(P.get_args(["--name=other"]))
    assert P.hash_args(P.get_args(["--name=other", "--out_dir=data/other"])) == named
    assert P.hash_args(P.get_args(["--name=other", "--out_dir=data/elsewhere"])) != named

def test_finished_data_is_not_replaced_by_other_arguments_and_moves_with_its_folder(tmp_path,
                                                                                    monkeypatch):
    """A folder prepared with other arguments stops the run with one line naming what changed, its
    files kept byte for byte; --force rebuilds it, and a stopped --force rebuild lets no other
    arguments in. The same arguments on a copy of the folder elsewhere (--out_dir, --name) are the
    same run: it is taken as prepared, and --codebook0_mel adds its files without a rebuild."""
    monkeypatch.setattr(P, "train_codec", lambda *a, **k: None)  # the codec's training: no part
    out = tmp_path / "out"
    base = ["--clips=6", "--max_seconds=1.0", "--val_percent=30"] + FAST
    P.main(base + [f"--out_dir={out}"])
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(SystemExit, match=r"other arguments \(--clips=6 then, 5 now\).*--force"):
        P.main(["--clips=5", "--max_seconds=1.0", "--val_percent=30", f"--out_dir={out}"] + FAST)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # a stopped --force rebuild resumes on the next run of its own arguments only: not for a
    # setting its encoded chunks do not depend on (--vocab_size)
    def crash(*a, **k):
        raise KeyboardInterrupt
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(P, "fit_codebooks", crash)
        P.main(base + [f"--out_dir={out}", "--force"])
    with pytest.raises(SystemExit, match=r"other arguments \(--vocab_size=4096 then, 300 now\)"):
        P.main(base + [f"--out_dir={out}", "--vocab_size=300"])
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    moved = tmp_path / "data" / "moved"
    shutil.copytree(out, moved)
    def encoded(*a, **k):
        raise AssertionError("the copied folder was encoded again")
    monkeypatch.setattr(P, "encode_clips", encoded)
    for place in ([f"--out_dir={moved}"], [f"--out_dir={moved}/"], ["--name=moved"]):
        monkeypatch.chdir(tmp_path)  # --name=moved is data/moved here
        assert P.main(base + place + ["--codebook0_mel"]) is not None
    assert (moved / "train_mel_c0.bin").stat().st_size > 0
    assert {n: (moved / n).read_bytes() for n in before} == before
    monkeypatch.undo()
    monkeypatch.setattr(P, "train_codec", lambda *a, **k: None)
    P.main(["--clips=5", "--max_seconds=1.0", "--val_percent=30", f"--out_dir={out}", "--force"]
           + FAST)
    assert json.loads((out / "meta.json").read_text())["args"]["clips"] == 5

def test_empty_output_names_and_a_vocab_under_the_bytes_are_refused():
    """--out_dir= or --name= (empty) would silently mean data/synth, and a corpus BPE needs its 256
    bytes: each is one line before any work."""
    for arg, words in (("--out_dir=", "--out_dir= is empty"), ("--name=", "--name= is empty"),
                       ("--vocab_size=0", "--vocab_size=0: must be at least 256"),
                       ("--kinds=", "--kinds=: an empty name; the corpus has")):
        with pytest.raises(SystemExit, match=words):
            P.check_args(P.get_args([arg, "--clips=4"]))


def test_a_reader_without_src_or_with_a_src_that_is_not_a_folder_is_one_line(tmp_path):
    """--dataset=folder or librispeech needs --src, and --src must be a directory: one line each,
    before any work."""
    (tmp_path / "a_file").write_text("")
    for args, words in ((["--dataset=folder"], "--dataset=folder needs --src=DIR"),
                        (["--dataset=librispeech"], "--dataset=librispeech needs --src=DIR"),
                        (["--dataset=folder", f"--src={tmp_path / 'nope'}"],
                         f"--src={tmp_path / 'nope'}: not a directory"),
                        (["--dataset=folder", f"--src={tmp_path / 'a_file'}"],
                         f"--src={tmp_path / 'a_file'}: not a directory")):
        with pytest.raises(SystemExit) as e:
            P.check_args(P.get_args(args))
        assert str(e.value) == f"error: {words}"


def test_the_summary_counts_skipped_inputs_not_kinds_of_problem(tmp_path, capsys):
    """print_summary: 'skipped N inputs' counts the files, each kind of problem with its count,
    the most frequent first."""
    from collections import Counter
    splits = {"train": {"clips": 2, "frames": 10}, "val": {"clips": 1, "frames": 5}}
    problems = Counter({"all silent": 1, "zero-length audio": 4})
    P.print_summary(tmp_path, splits, None, problems, 2.0, 0.0, 1.0)
    out = capsys.readouterr().out
    assert "skipped 5 inputs: 4 x zero-length audio, 1 x all silent" in out


def test_codec_from_the_output_directory_itself_is_refused(tmp_path):
    """--codec_from naming the output directory, however the path is spelled, stops before any
    work (the run would replace the codec it copies)."""
    d = tmp_path / "data"
    d.mkdir()
    (d / "meta.json").write_text(json.dumps({"codec": {"name": "encodec_24khz",
                                                       "pretrained": True}}))
    for spelled in (str(d), f"{d}/../{d.name}"):
        with pytest.raises(SystemExit, match="is the output directory itself"):
            P.check_args(P.get_args([f"--out_dir={d}", f"--codec_from={spelled}", "--clips=4"]))

def test_no_speech_with_only_speech_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    """--no_speech --kinds=speech leaves no kind to make: one line naming both, before the output
    folder is made. --kinds=speech where speech cannot be synthesised: one line naming the cause,
    without first saying the corpus will be built without speech."""
    with pytest.raises(SystemExit, match="--no_speech with --kinds=speech"):
        P.main(["--no_speech", "--kinds=speech", f"--out_dir={tmp_path / 'a'}"] + FAST)
    assert not (tmp_path / "a").exists()
    # with other kinds too: speech was left out without a word, the corpus all music
    with pytest.raises(SystemExit, match="--no_speech with --kinds=music,speech: speech is one of"):
        P.check_args(P.get_args(["--no_speech", "--kinds=speech,music"]))
    monkeypatch.setattr(P, "speech_problem", lambda: "libespeak-ng.so: cannot be loaded")
    with pytest.raises(SystemExit, match="--kinds=speech.*libespeak-ng.so: cannot be loaded"):
        P.main(["--kinds=speech", f"--out_dir={tmp_path / 'b'}"] + FAST)
    assert "without speech" not in capsys.readouterr().out

def test_offline_codec_asked_for_is_not_said_to_be_for_want_of_weights(tmp_path, capsys):
    """With --offline_codec no pretrained weights are looked for: the codec's line says why it is
    the offline one."""
    P.get_codec(P.get_args(["--offline_codec"]), tmp_path)
    out = capsys.readouterr().out
    assert "OFFLINE EnCodec (--offline_codec was given" in out and "not found" not in out

def test_audio_seconds_are_the_same_resumed_or_not(tmp_path, monkeypatch):
    """meta.json's audio_seconds sums the clips' stored (rounded) durations, encoded now or resumed
    from chunks: 300 clips of 2401 samples (0.100042 s, stored as 0.1) make 30.0 s either way (not
    30.0125 when encoded now)."""
    monkeypatch.setattr(P, "encode_emb", lambda codec, wavs: [torch.zeros(A.n_frames(len(w)), 128)
                                                              for w in wavs])
    def clips(skip=()):
        for i in range(300):
            if f"c{i:03d}" not in skip:
                yield np.full(2401, 0.1, np.float32), {"id": f"c{i:03d}"}
    args = P.get_args(["--quiet"])
    seconds = lambda: P.encode_clips(None, clips, 300, args, tmp_path, time.time())[-1]
    fresh, _ = seconds()
    (tmp_path / "chunk00002.npz").unlink()           # killed while encoding the last chunk
    partly, resumed = seconds()
    whole, all_resumed = seconds()
    assert 0 < resumed < partly and all_resumed == whole
    assert fresh == partly == whole and round(fresh, 2) == 30.0

def test_codebook0_mels_closes_the_files_it_reads(tmp_path, monkeypatch):
    """codebook0_mels reads each split's clips.jsonl and closes it (no ResourceWarning)."""
    meta = {"n_q": A.N_Q, "n_mels": A.N_MELS,
            "splits": {s: {"clips": 1, "frames": 2} for s in ("train", "val")}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    for s in ("train", "val"):
        (tmp_path / f"{s}_clips.jsonl").write_text(json.dumps({"offset": 0, "frames": 2}) + "\n")
        np.zeros((2, A.N_Q), np.uint16).tofile(tmp_path / f"{s}_codes.bin")
    monkeypatch.setattr(P, "load_codec", lambda data_dir: "codec")
    monkeypatch.setattr(P, "decode", lambda codec, codes: torch.zeros(len(codes) * A.HOP))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        P.codebook0_mels(tmp_path, quiet=True)
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert (tmp_path / "val_mel_c0.bin").stat().st_size == 2 * A.N_MELS * 2

def test_val_percent_0_sends_no_clip_to_val_and_100_every_clip():
    """is_val over 3000 ids (a few of which hash to 0 mod 1000, the edge of the comparison): 0 %
    sends none to val, 100 % all of them, 10 % about a tenth."""
    ids = [f"clip-{i}" for i in range(3000)]
    assert not any(P.is_val(i, 0) for i in ids)
    assert all(P.is_val(i, 100) for i in ids)
    assert 0.08 < np.mean([P.is_val(i, 10) for i in ids]) < 0.12

def test_small_corpora_keep_a_clip_on_each_side_unless_val_percent_is_0(tmp_path):
    """write_splits on 3 clips: all hashed to val (--val_percent=100), the first stays in train;
    all hashed to train (10 %), the last goes to val (a split without clips cannot be mmapped);
    --val_percent=0 keeps val empty. The clip lists, offsets and frame counts follow."""
    def write(ids, pct):
        infos = [{"id": i, "source": i, "kind": "file", "duration": 0.1, "labels": {}}
                 for i in ids]
        codes = [np.full((k + 2, A.N_Q), k, np.uint16) for k in range(len(ids))]
        mels = [np.full((k + 2, A.N_MELS), k, np.float16) for k in range(len(ids))]
        out = tmp_path / str(pct)
        out.mkdir()
        stage = P.Staging(out)
        splits = P.write_splits(infos, codes, mels, [None] * len(ids),
                                P.get_args([f"--val_percent={pct}"]), stage)
        stage.commit()
        lists = {s: [json.loads(l) for l in (out / f"{s}_clips.jsonl").read_text().splitlines()]
                 for s in ("train", "val")}
        for s, clips in lists.items():
            assert [c["offset"] for c in clips] == list(np.cumsum([0] + [c["frames"]
                                                                    for c in clips])[:-1])
            assert splits[s] == {"clips": len(clips), "frames": sum(c["frames"] for c in clips)}
        return {s: [c["id"] for c in clips] for s, clips in lists.items()}
    ids = [f"c{i}" for i in range(40)]
    assert write(ids[:3], 100) == {"train": ["c0"], "val": ["c1", "c2"]}
    train_only = [i for i in ids if not P.is_val(i, 10)][:3]
    assert write(train_only, 10) == {"train": train_only[:2], "val": train_only[2:]}
    assert write(ids[:3], 0) == {"train": ids[:3], "val": []}


def test_split_files_hold_each_clips_own_codes_and_mel_at_its_offset(tmp_path):
    """write_splits: the rows of {split}_codes.bin and {split}_mel.bin at a clip's offset are that
    clip's codes and mel, in both splits (clips interleaved between them by is_val)."""
    ids = [f"c{i}" for i in range(12)]
    infos = [{"id": i, "source": i, "kind": "file", "duration": 0.1, "labels": {}} for i in ids]
    codes = [np.full((k + 2, A.N_Q), k, np.uint16) for k in range(len(ids))]
    mels = [np.full((k + 2, A.N_MELS), -k / 16, np.float16) for k in range(len(ids))]
    args = P.get_args(["--val_percent=50"])
    assert 0 < sum(P.is_val(i, 50) for i in ids) < len(ids)
    stage = P.Staging(tmp_path)
    P.write_splits(infos, codes, mels, [None] * len(ids), args, stage)
    stage.commit()
    for s in ("train", "val"):
        c = np.fromfile(tmp_path / f"{s}_codes.bin", np.uint16).reshape(-1, A.N_Q)
        m = np.fromfile(tmp_path / f"{s}_mel.bin", np.float16).reshape(-1, A.N_MELS)
        clips = [json.loads(l) for l in (tmp_path / f"{s}_clips.jsonl").read_text().splitlines()]
        assert clips and len(c) == sum(len(codes[ids.index(r["id"])]) for r in clips)
        for r in clips:
            k = ids.index(r["id"])
            assert np.array_equal(c[r["offset"]:r["offset"] + len(codes[k])], codes[k])
            assert np.array_equal(m[r["offset"]:r["offset"] + r["frames"]], mels[k])


def test_a_commit_that_fails_half_way_leaves_no_meta_json(tmp_path, monkeypatch):
    """Staging.commit removes the old meta.json before renaming anything and puts the new one in
    place last: a commit stopped after its first rename (a full disk, a kill) leaves a folder
    without meta.json, which the next run rebuilds, never a meta.json beside a mix of old and new
    files, which it would take as finished."""
    (tmp_path / "meta.json").write_text('{"old": true}')
    (tmp_path / "train_mel.bin").write_bytes(b"old")
    stage = P.Staging(tmp_path)
    for name in ("train_mel.bin", "val_mel.bin", "meta.json"):
        stage(name).write_bytes(b"new " + name.encode())
    replace, calls = P.os.replace, []

    def fails_second(src, dst):
        calls.append(Path(dst).name)
        if len(calls) == 2:
            raise OSError("disk full")
        replace(src, dst)
    monkeypatch.setattr(P.os, "replace", fails_second)
    with pytest.raises(OSError):
        stage.commit()
    assert not (tmp_path / "meta.json").exists() and len(calls) == 2
    monkeypatch.undo()
    stage = P.Staging(tmp_path)  # run again: the whole commit goes through, meta.json last
    for name in ("train_mel.bin", "val_mel.bin", "meta.json"):
        stage(name).write_bytes(b"new " + name.encode())
    stage.commit()
    assert [(tmp_path / n).read_bytes() for n in ("train_mel.bin", "val_mel.bin", "meta.json")] == [
        b"new train_mel.bin", b"new val_mel.bin", b"new meta.json"]
    assert not list(tmp_path.glob("*.tmp*"))


def test_codebook0_mel_on_a_finished_run_adds_its_files_without_a_rebuild(tmp_path, capsys,
                                                                          monkeypatch):
    """--codebook0_mel on a directory prepared without it: the option is not in the arguments'
    hash, so the data is taken as prepared and kept byte for byte, and {split}_mel_c0.bin is made
    from its codes, one mel frame per code frame."""
    monkeypatch.setattr(P, "train_codec", lambda *a, **k: None)  # the codec's training: no part
    out = tmp_path / "out"
    base = ["--clips=6", "--max_seconds=1.0", f"--out_dir={out}", "--val_percent=30"] + FAST
    P.main(base)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    P.main(base + ["--codebook0_mel"])
    assert "already prepared" in capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    import sample as S
    tools = S.Tools(str(out))
    for split in ("train", "val"):
        c0 = np.fromfile(out / f"{split}_mel_c0.bin", np.float16).reshape(-1, meta["n_mels"])
        assert len(c0) == meta["splits"][split]["frames"] > 0
        inp, clip = S.read_clip(str(out), split, 0)  # its first clip: the mel of codebook 0 alone
        want = tools.mel(tools.decode(inp["codes"][:, :1]).numpy())
        got = c0[clip["offset"]:clip["offset"] + clip["frames"]].astype(np.float32)
        assert np.abs(got - want).max() < 2e-3  # float16 storage
    assert {n: (out / n).read_bytes() for n in before} == before
    # a split without clips (--val_percent=0) gets an empty file
    empty = tmp_path / "no_val"
    P.main(["--clips=3", "--max_seconds=1.0", f"--out_dir={empty}", "--val_percent=0",
            "--codebook0_mel"] + FAST)
    assert (empty / "val_mel_c0.bin").stat().st_size == 0
    assert (empty / "train_mel_c0.bin").stat().st_size > 0


# -----------------------------------------------------------------------------
# speech (libespeak-ng from espeakng-loader)

def f0(x, sr=SR):
    """Median pitch (Hz) of the voiced 40 ms frames of x, by autocorrelation."""
    hz = []
    for s in range(0, len(x) - 960, 480):
        w = x[s:s + 960].astype(np.float64)
        if w.std() < 0.05 * np.abs(x).max():
            continue
        ac = np.correlate(w, w, "full")[len(w) - 1:]
        k = sr // 400 + int(np.argmax(ac[sr // 400:sr // 60]))
        if ac[k] > 0.4 * ac[0]:
            hz.append(sr / k)
    return float(np.median(hz)) if hz else 0.0


def test_speech_voice_and_sentence_change_the_audio():
    text = "put the green bottle in the kitchen."
    man, woman = Y.speak(text, "en-us+Andy"), Y.speak(text, "en+f3")
    for w in (man, woman):
        # float32, not silent, not clipped
        assert w.dtype == np.float32 and np.sqrt(np.mean(w ** 2)) > 0.03 and np.abs(w).max() < 1.0
        assert 1.0 < len(w) / SR < 3.0
    # the same words in two voices: a man's and a woman's pitch
    assert f0(man) < 150 < f0(woman)
    short = Y.speak("stop.", "en-us+Andy")
    # a longer sentence gives longer audio
    assert 0.2 < len(short) / SR and len(short) < 0.5 * len(man)
    # the same call gives the same samples whatever was spoken before (the library is reloaded for
    # each sentence)
    assert np.array_equal(Y.speak(text, "en-us+Andy"), man)


def test_every_speaker_gives_the_same_samples_in_a_new_process():
    """Two processes speak the same sentence in every voice: identical samples. The breathy voices
    (f2, f3, Alicia) draw noise from espeak's own generator, which is seeded from the clock unless
    synth.speak seeds it; a resumed prepare.py would then write other audio than an uninterrupted
    one."""
    import hashlib
    import subprocess
    code = ("import hashlib, synth; print(' '.join(hashlib.md5(synth.speak('check eighty grey "
            "tables', v, r, p).tobytes()).hexdigest() for v, _, r, p in synth.SPEAKERS.values()))")
    root = Path(__file__).resolve().parent.parent
    runs = [subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                           check=True).stdout
            for _ in range(2)]
    here = " ".join(hashlib.md5(Y.speak("check eighty grey tables", v, r, p).tobytes()).hexdigest()
                    for v, _, r, p in Y.SPEAKERS.values())
    assert runs[0].split() == runs[1].split() == here.split()


def test_every_speaker_exists_and_its_pitch_matches_its_sex():
    import espeakng_loader
    variants = Path(espeakng_loader.get_data_path()) / "voices" / "!v"
    assert len(set(Y.SPEAKERS.values())) == len(Y.SPEAKERS) >= 8
    for name, (voice, sex, rate, pitch) in Y.SPEAKERS.items():
        # espeak-ng falls back silently on an unknown variant
        assert (variants / voice.split("+")[1]).is_file(), voice
        hz = f0(Y.speak("hello there, how are you?", voice, rate, pitch))
        assert (hz < 150 if sex == "male" else hz > 150), (name, hz)
    assert {s for _, s, _, _ in Y.SPEAKERS.values()} == {"male", "female"}


def test_speech_grammar_is_varied():
    rng = np.random.default_rng(0)
    texts = [Y.sentence(rng)[0] for _ in range(300)]
    assert len(set(texts)) > 290
    words = {w for t in texts for w in t.split()}
    # a few hundred words, not a handful of fixed sentences
    assert len(words) > 200
    assert {"red", "kitchen", "forty", "call", "where", "monday"} <= words


def test_speech_places_take_in_or_at_as_english_does():
    rng = np.random.default_rng(1)
    table = {"kitchen": "in", "garage": "in", "library": "in", "station": "at", "beach": "at",
             "bank": "at", "market": "at"}
    seen = set()
    for _ in range(400):
        text = Y.sentence(rng)[0]
        for place, prep in table.items():
            for said in re.findall(rf"\b(in|at) the {place}\b", text):
                assert said == prep, text
                seen.add(place)
    assert len(seen) >= 4


def test_speech_clip_text_matches_what_is_spoken():
    seen = set()
    for wav, info in synth_of_kind("speech", 6, 2.0):
        t, labels = info["transcript"], info["labels"]
        voice, sex, rate, pitch = Y.SPEAKERS[labels["speaker"]]
        who = "a man" if sex == "male" else "a woman"
        assert info["kind"] == "speech" and labels == {"class": "speech",
                                                       "speaker": labels["speaker"], "gender": sex}
        assert (info["caption"].startswith(who + " ") and t in info["caption"]
                and t in info["description"])
        qa = {q["q"]: q["a"] for q in info["qa"]}
        assert (qa["what does the speaker say?"] == t
                and qa["is the speaker a man or a woman?"] == who)
        for q, a in qa.items():
            if q.startswith(("what colour", "what object", "what place", "who", "what number",
                             "what day", "which")):
                assert re.search(rf"\b{a}", t), (q, a, t)  # each answer is in the sentence
                seen.add(q)
        # the audio is that sentence in that voice: the clip holds speak()'s samples, scaled, after
        # a silence
        question = qa["is it a command, a question or a statement?"] == "question"
        ref = Y.speak(t + ("?" if question else "."), voice, rate, pitch)
        assert len(ref) < len(wav) <= 2.0 * SR
        # align at -60 dB, not at the first nonzero sample: after other tests in the same process
        # the faintest leading samples came out zero in one of the two (seen in the full suite),
        # shifting the comparison
        onset = lambda x: np.flatnonzero(np.abs(x) > 1e-3 * np.abs(x).max())[0]
        start = onset(wav) - onset(ref)
        seg = wav[start:start + len(ref)]
        np.testing.assert_allclose(seg / np.abs(seg).max(), ref / np.abs(ref).max(), atol=1e-4)
    assert len(seen) >= 3


def test_speech_library_that_will_not_load_is_reported(tmp_path, capsys, monkeypatch):
    import espeakng_loader
    missing = tmp_path / "libespeak-ng.so"
    monkeypatch.setattr(espeakng_loader, "get_library_path", lambda: str(missing))
    assert str(missing) in Y.speech_problem()
    with pytest.raises(Y.SpeechUnavailable, match=re.escape(str(missing))):
        Y.speak("hello.", "en-us+Andy")
    with pytest.raises(SystemExit, match=re.escape(str(missing))) as e:
        P.main(["--clips=4", f"--out_dir={tmp_path / 'a'}", "--strict"] + FAST)
    assert "--strict" in str(e.value) and not (tmp_path / "a" / "meta.json").exists()
    capsys.readouterr()
    # clips 0, 1 and 3 would be speech
    P.main(["--clips=4", "--max_seconds=2", f"--out_dir={tmp_path / 'b'}"] + FAST)
    out = capsys.readouterr().out
    # one clear line
    assert out.count(str(missing)) == 1 and "building the corpus without speech" in out
    meta = json.loads((tmp_path / "b" / "meta.json").read_text())
    assert meta["args"]["no_speech"] is True
    clips = [json.loads(l) for s in ("train", "val")
             for l in (tmp_path / "b" / f"{s}_clips.jsonl").read_text().splitlines()]
    assert len(clips) == 4 and not any(c["kind"] == "speech" for c in clips)
    # a corpus without speech (--kinds) needs no speech library, even with --strict, and hashes
    # as it does where the library loads
    capsys.readouterr()
    P.main(["--clips=2", "--max_seconds=2", "--kinds=morse", f"--out_dir={tmp_path / 'c'}",
            "--strict"] + FAST)
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["args"]["no_speech"] is False and str(missing) not in capsys.readouterr().out


def test_the_work_of_two_codecs_is_kept_apart(tmp_path):
    """A run resumes only the encoded chunks of its own codec: a run killed with the offline codec
    and re-run where the pretrained EnCodec can be had (or the other way round) starts anew."""
    offline = P.work_dir(tmp_path, "0123abcd", "encodec_24khz-offline", False)
    pretrained = P.work_dir(tmp_path, "0123abcd", "encodec_24khz", False)
    assert offline != pretrained and offline.is_dir() and pretrained.is_dir()
    (offline / "chunk00000.npz").write_bytes(b"x")
    assert not list(pretrained.iterdir())
    assert P.work_dir(tmp_path, "0123abcd", "encodec_24khz-offline", False) == offline
    assert (offline / "chunk00000.npz").exists()  # found again by a re-run of the same codec


def test_a_rerun_with_another_codec_does_not_resume_the_first_ones_chunks(tmp_path, monkeypatch,
                                                                          capsys):
    """Through main: a run stopped after encoding, re-run with the same codec, resumes its chunks;
    re-run with a codec of another name, it encodes anew in a work folder of its own."""
    out = tmp_path / "out"
    args = ["--clips=4", "--max_seconds=1.0", f"--out_dir={out}"] + FAST
    real_quantize = P.quantize_clips

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(P, "quantize_clips", stop)  # stopped after pass 1 (the encoding)
    with pytest.raises(KeyboardInterrupt):
        P.main(args)
    with pytest.raises(KeyboardInterrupt):
        P.main(args)
    assert "resuming: 4 clips already encoded" in capsys.readouterr().out
    real_get_codec = P.get_codec

    def other_codec(*a, **k):
        codec, info = real_get_codec(*a, **k)
        return codec, {**info, "name": info["name"] + "-other"}

    monkeypatch.setattr(P, "get_codec", other_codec)
    monkeypatch.setattr(P, "quantize_clips", real_quantize)
    P.main(args)
    assert "resuming" not in capsys.readouterr().out
    assert json.loads((out / "meta.json").read_text())["codec"]["name"].endswith("-other")
    assert not list(out.glob(".work-*"))  # a finished run leaves no work folder, of any codec


def test_pretrained_lookups_fail_fast_and_clearly(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="encodec_24khz-d7cc33bc.th"):
        A.find_codec_weights(tmp_path)                  # --codec_dir without the weights
    with pytest.raises(SystemExit, match=f"error: --codec_dir={tmp_path}: no encodec_24khz"):
        P.main(["--clips=2", f"--out_dir={tmp_path / 'd'}", f"--codec_dir={tmp_path}", "--quiet"])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert A.find_codec_weights(None) is None           # no hub cache either -> the offline codec
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    # -> the offline BPE, without touching the network
    assert not T.gpt2_files_cached()
    # data coded with the pretrained EnCodec on another machine: its weights are looked for in the
    # hub cache too, and missing everywhere they are named (not a FileNotFoundError traceback)
    data = tmp_path / "moved"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps({"codec": {
        "pretrained": True, "weights": str(tmp_path / "gone" / "encodec_24khz-d7cc33bc.th")}}))
    with pytest.raises(ValueError, match="pretrained EnCodec, whose weights .* neither at .*gone"):
        A.load_codec(data)
    # ... and read from the hub cache when they are there (a seeded stand-in for the download)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    want = A.offline_codec(seed=7).state_dict()
    torch.save(want, tmp_path / "hub" / "checkpoints" / "encodec_24khz-d7cc33bc.th")
    monkeypatch.setattr("encodec.model._check_checksum", lambda file, checksum: None)
    got = A.load_codec(data).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_the_corpus_generator_writes_at_the_data_contract_rate():
    """synth.py keeps its own copy of the sample rate (it is numpy only; audio.py imports torch)."""
    assert Y.SAMPLE_RATE == A.SAMPLE_RATE
    wav, info = Y.synth_clip(1337, 0, 1.0)
    assert len(wav) <= Y.SAMPLE_RATE * 1.0 + 1 and info["kind"]


def test_manifest_rows_outside_src_and_names_with_colons_are_reported_whole(tmp_path):
    src, outside = tmp_path / "src", tmp_path / "elsewhere.wav"
    src.mkdir()
    sf.write(src / "good.wav", sine(440, 0.5), SR)
    sf.write(outside, sine(440, 0.5), SR)
    (src / "bad: take 2.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 4)
    (src / "manifest.jsonl").write_text(json.dumps({"file": str(outside), "caption": "x"}) + "\n"
                                        + json.dumps({"file": "../elsewhere.wav"}) + "\n")
    problems = []
    report = lambda where, why: problems.append((where, why))
    clips, n = P.clip_list(P.get_args(["--dataset=folder", f"--src={src}"]), report)
    assert problems == [(str(outside), "named in the manifest but outside --src (only the files "
                                       "under it are read)")]
    assert [info["id"] for _, info in clips()] == ["good.wav"] and n == 2
    where, why = problems[1]
    assert where == str(src / "bad: take 2.wav") and why.startswith("unreadable or corrupt audio")


def test_a_rebuild_leaves_no_codec_files_of_the_run_before(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for k, hz in enumerate([300, 500]):
        sf.write(src / f"tone{k}.wav", sine(hz, 0.5), SR)
    out.mkdir()
    (out / "codec.pt").write_bytes(b"an earlier run's offline codec")
    (out / "codec.png").write_bytes(b"its picture")
    P.main(["--dataset=folder", f"--src={src}", f"--out_dir={out}", "--no_codes", "--quiet",
            "--force"])  # a rebuild over the earlier run (no meta.json: else refused)
    assert json.loads((out / "meta.json").read_text())["codec"] is None
    assert not (out / "codec.pt").exists() and not (out / "codec.png").exists()


def test_flags_that_only_watch_a_run_are_not_hashed():
    """--strict, --quiet, --force and --codebook0_mel change how a run goes, not its output: a
    finished folder re-run with one of them is the same data, not "other arguments"."""
    base = P.hash_args(P.get_args([]))
    for flag in ("--strict", "--quiet", "--force", "--codebook0_mel"):
        assert P.hash_args(P.get_args([flag])) == base, flag


def test_codebook0_mels_decode_codebook_0_alone(tmp_path, monkeypatch):
    """codebook0_mels decodes each clip's first codebook only (the codes of every codebook differ
    here, 1..n_q: the decoder must see 1s alone)."""
    meta = {"n_q": A.N_Q, "n_mels": A.N_MELS,
            "splits": {s: {"clips": 1, "frames": 2} for s in ("train", "val")}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    for s in ("train", "val"):
        (tmp_path / f"{s}_clips.jsonl").write_text(json.dumps({"offset": 0, "frames": 2}) + "\n")
        np.tile(np.arange(1, A.N_Q + 1, dtype=np.uint16), (2, 1)).tofile(
            tmp_path / f"{s}_codes.bin")
    seen = []
    monkeypatch.setattr(P, "load_codec", lambda d: "codec")
    monkeypatch.setattr(P, "decode", lambda c, codes: (seen.append(np.asarray(codes).tolist()),
                                                       torch.zeros(len(codes) * A.HOP))[1])
    P.codebook0_mels(tmp_path, quiet=True)
    assert seen == [[[1], [1]], [[1], [1]]]


def test_a_rebuild_removes_the_files_the_new_data_lacks(tmp_path, monkeypatch):
    """--force rebuilds without --codebook0_mel, or with --no_codes: the old codebook-0 mels, or
    codes, which would no longer line up with the new data, are gone."""
    monkeypatch.setattr(P, "train_codec", lambda *a, **k: None)
    out = tmp_path / "out"
    base = ["--max_seconds=1.0", f"--out_dir={out}", "--val_percent=30"]
    P.main(base + ["--clips=6", "--codebook0_mel"] + FAST)
    assert (out / "train_mel_c0.bin").exists()
    P.main(base + ["--clips=5", "--force"] + FAST)
    assert not list(out.glob("*_mel_c0.bin"))
    P.main(base + ["--clips=5", "--force", "--quiet", "--no_codes", "--offline"])
    assert not list(out.glob("*codes*"))


def test_librispeech_clips_are_labelled_with_speaker_and_chapter_and_asked_what_is_said(tmp_path):
    """A LibriSpeech utterance: class speech, its speaker and chapter from the folders, and the
    question of what the speaker says, answered by its transcript (lower case)."""
    d = tmp_path / "19" / "198"
    d.mkdir(parents=True)
    sf.write(d / "19-198-0000.flac", np.zeros(1600, np.float32), 16000)
    (d / "19-198.trans.txt").write_text("19-198-0000 HELLO THERE\n")
    items = P.librispeech_items(tmp_path, lambda *a: None)
    assert items[0]["labels"] == {"class": "speech", "speaker": "19", "chapter": "198"}
    assert items[0]["qa"] == [{"q": "what does the speaker say?", "a": "hello there"}]


def test_a_folder_prepared_at_its_default_place_by_absolute_path_is_known_when_moved(tmp_path,
                                                                                    monkeypatch):
    """--out_dir given as the absolute path of the default place (cwd/data/synth) hashes as the
    default place; a copy of that folder, prepared elsewhere from another directory, is the same
    data."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    monkeypatch.chdir(a)
    then = P.get_args([f"--out_dir={a / 'data' / 'synth'}"])
    meta = {"args": vars(then), "args_hash": P.hash_args(then)}
    monkeypatch.chdir(b)
    assert P.prepared_elsewhere(meta, P.get_args([f"--out_dir={b / 'moved'}"]))


def test_the_split_of_a_clip_is_its_ids_md5_per_mille():
    """is_val is a fixed function of the id (data prepared earlier keeps its split): the first 32
    bits of the id's MD5, big-endian, per mille, below val_percent * 10. Checked against that
    formula written from the digest's bytes, over ids and percentages."""
    import hashlib
    ids = [f"clip-{i}" for i in range(2000)] + ["synth-000000", "84-121123-0000", "sub/a.wav"]
    for pct in (0.1, 10, 33.3, 50, 99.9):
        for i in ids:
            per_mille = int.from_bytes(hashlib.md5(i.encode()).digest()[:4], "big") % 1000
            assert P.is_val(i, pct) == (per_mille < round(pct * 10)), (i, pct)


def test_a_single_clip_stays_in_train_whatever_val_percent(tmp_path):
    """One clip: train keeps it at any --val_percent, even 100 (train.py reads the train split;
    an empty val split is only noted)."""
    for pct in (0, 10, 100):
        out = tmp_path / str(pct)
        out.mkdir()
        stage = P.Staging(out)
        infos = [{"id": "only", "source": "only", "kind": "file", "duration": 0.1, "labels": {}}]
        splits = P.write_splits(infos, [np.zeros((3, A.N_Q), np.uint16)],
                                [np.zeros((3, A.N_MELS), np.float16)], [None],
                                P.get_args([f"--val_percent={pct}"]), stage)
        assert splits == {"train": {"clips": 1, "frames": 3}, "val": {"clips": 0, "frames": 0}}


def test_librispeech_items_from_a_relative_src_report_no_transcribed_file(tmp_path, monkeypatch):
    """--src given relative to the working directory: the files with a transcript line are items
    and not also reported as lacking one (the reported paths are compared resolved)."""
    d = tmp_path / "LS" / "19" / "198"
    d.mkdir(parents=True)
    for k in range(2):
        sf.write(d / f"19-198-000{k}.flac", sine(300, 0.1, sr=16000), 16000)
    (d / "19-198.trans.txt").write_text("19-198-0000 HELLO\n19-198-0001  GOOD BYE\n")
    monkeypatch.chdir(tmp_path)
    problems = []
    items = P.librispeech_items("LS", lambda what, why: problems.append((what, why)))
    assert problems == []
    # the text after the id, however many spaces apart
    assert [it["transcript"] for it in items] == ["hello", "good bye"]


def test_gpt2_offline_splits_text_as_tiktokens_own_gpt2_pattern(no_tiktoken_cache):
    """The offline GPT-2 BPE (openai-whisper's ranks with GPT2_PAT) encodes as tiktoken's own
    r50k pattern does with the same ranks, on contractions, numbers, spaces and punctuation; "I'd"
    is GPT-2's published "I", "'d"."""
    import tiktoken
    from tiktoken_ext import openai_public
    r50k_pat_str = getattr(openai_public, "r50k_pat_str", None)  # a name of tiktoken 0.8 on
    if r50k_pat_str is None:
        pytest.skip("tiktoken before 0.8 does not name GPT-2's pattern")
    tok = T.load_gpt2(offline=True)
    ref = tiktoken.Encoding(name="ref", pat_str=r50k_pat_str,
                            mergeable_ranks=T.load_ranks(T.whisper_gpt2_file()),
                            special_tokens={T.EOT: T.GPT2_EOT})
    texts = ["I'd say we'd", "she's, it's, we're, they've, I'm, you'll", "in 2019 and 12,345.6",
             " 7 days  later\n\n  x", "a\tb  \n c?!  ", "Ünïcødé ✓ 42nd -3 'quoted'"]
    for t in texts:
        assert tok.encode_ordinary(t) == ref.encode_ordinary(t), t
    assert tok.encode("I'd") == [40, 1549]


def test_synth_clip_list_skips_the_ids_it_is_given():
    """clip_list's generator leaves out the clips whose ids are in skip (what a resumed run has in
    its chunks), by the ids the clips carry: the others come in index order, each once."""
    args = P.get_args(["--clips=4", "--max_seconds=1.0", "--no_speech"])
    clips, n = P.clip_list(args, P.InputProblems(False))
    ids = [info["id"] for _, info in clips()]
    assert n == 4 and ids == [f"synth-{i:06d}" for i in range(4)]
    assert [info["id"] for _, info in clips(skip={ids[0], ids[2]})] == [ids[1], ids[3]]
    assert list(clips(skip=set(ids))) == []


def test_each_split_lists_its_clips_in_id_order(synth_dir):
    """The clips of each split are stored in the order of their ids (encode_clips sorts them: a
    chunk is encoded shortest first), so a clip's index and offset do not depend on its length."""
    for split in ("train", "val"):
        ids = [json.loads(l)["id"]
               for l in Path(synth_dir, f"{split}_clips.jsonl").read_text().splitlines()]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)


@pytest.mark.parametrize("damage,said", [
    ("unlink", "lacks train_mel.bin: rebuilding"),
    ("cut", "has train_mel.bin of another size than its frames: rebuilding")])
def test_a_finished_run_missing_or_cutting_one_of_its_files_is_rebuilt(tmp_path, capsys, damage,
                                                                        said):
    """A re-run with the same arguments skips a finished folder, but not one that lost one of its
    files (output_files), nor one whose mel (or codes) file is not the size of its split's frames
    (train.py refuses that with "prepare.py again"; the same command said "already prepared"): it
    says which, and rebuilds it as it was."""
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for k, hz in enumerate((300, 500)):
        sf.write(src / f"t{k}.wav", sine(hz, 0.2), SR)
    args = ["--dataset=folder", f"--src={src}", f"--out_dir={out}", "--no_codes", "--quiet"]
    P.main(args)
    mel = (out / "train_mel.bin").read_bytes()
    if damage == "unlink":
        (out / "train_mel.bin").unlink()
    else:
        (out / "train_mel.bin").write_bytes(mel[:1000])
    capsys.readouterr()
    P.main(args)
    assert said in capsys.readouterr().out
    assert (out / "train_mel.bin").read_bytes() == mel


def test_only_the_manifest_at_the_top_of_src_is_read_as_one(tmp_path):
    """manifest.csv / manifest.jsonl are the folder's manifest at --src's top only; a file of that
    name in a subfolder is another input, reported as not audio, not silently passed over."""
    (tmp_path / "sub").mkdir()
    sf.write(tmp_path / "sub" / "a.wav", sine(440, 0.1), SR)
    (tmp_path / "manifest.csv").write_text("file,caption\nsub/a.wav,a tone\n")
    (tmp_path / "sub" / "manifest.csv").write_text("file,caption\na.wav,other\n")
    problems = []
    items = P.folder_items(tmp_path, lambda what, why, kept=False: problems.append((what, why)))
    assert [(it["id"], it["caption"]) for it in items] == [("sub/a.wav", "a tone")]
    assert problems == [(str(tmp_path / "sub" / "manifest.csv"),
                         "not an audio file (extension '.csv')")]


def test_input_problems_count_kinds_before_any_detail_and_not_warnings(capsys):
    """InputProblems keys its count by the problem's text before any " (" or ":": the details of
    one file (its transcript's name, why its line is missing) do not make kinds of their own; a
    problem with kept=True is a warning line and no skipped input."""
    problems = P.InputProblems(strict=False)
    problems("a.flac", "missing transcript (empty line)")
    problems("b.flac", "missing transcript (no line in any .trans.txt)")
    problems("c.flac", "missing file, listed in a transcript (1-2.trans.txt)")
    problems("d.flac", "missing file, listed in a transcript (3-4.trans.txt)")
    problems("m.jsonl:3", "'qa' is not a list (...); the row's 'qa' ignored", kept=True)
    assert problems.counts == {"missing transcript": 2, "missing file, listed in a transcript": 2}
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 5 and out[-1].startswith("warning: m.jsonl:3: 'qa' is not a list")


def test_codec_from_a_copy_names_the_corpus_the_codec_was_fitted_on(synth_dir, tmp_path):
    """--codec_from a corpus that itself took its codec --codec_from another: meta.json's codec
    "from" still names the first corpus, and its note says once where the codec was fitted."""
    src, first, second = tmp_path / "src", tmp_path / "first", tmp_path / "second"
    shutil.copytree(synth_dir, src)
    base = ["--clips=2", "--max_seconds=1.0", "--quiet", "--offline", "--codec_report=0"]
    P.main(base + [f"--out_dir={first}", f"--codec_from={src}"])
    P.main(base + [f"--out_dir={second}", f"--codec_from={first}"])
    codec = json.loads((second / "meta.json").read_text())["codec"]
    assert codec["from"] == str(src)
    assert codec["note"].count("fitted on the corpus of") == 1 and str(src) in codec["note"]
    assert A.codec_id(second) == A.codec_id(src)


def test_a_stopped_forced_rebuild_resumes_without_force(tmp_path, capsys, monkeypatch):
    """--force with other arguments over finished data, stopped after pass 1: the same command
    without --force resumes that rebuild (its encoded clips) instead of refusing the folder as
    holding data of other arguments."""
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for k, hz in enumerate((300, 500, 700)):
        sf.write(src / f"t{k}.wav", sine(hz, 0.2), SR)
    base = ["--dataset=folder", f"--src={src}", f"--out_dir={out}", "--no_codes", "--quiet"]
    P.main(base)
    def crash(*a, **k):
        raise KeyboardInterrupt
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(P, "write_tokenizer", crash)
        P.main(base + ["--vocab_size=300", "--force"])
    capsys.readouterr()
    P.main(base + ["--vocab_size=300"])
    log = capsys.readouterr().out
    assert "a rebuild with these that was stopped: resuming it" in log
    assert "resuming: 3 clips already encoded" in log
    assert json.loads((out / "meta.json").read_text())["args"]["vocab_size"] == 300


def test_tiktoken_cache_dir_follows_tiktokens_own_precedence(monkeypatch):
    """As tiktoken reads it: TIKTOKEN_CACHE_DIR over DATA_GYM_CACHE_DIR over the temp folder's
    data-gym-cache ("" turns caching off)."""
    import tempfile
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    monkeypatch.delenv("DATA_GYM_CACHE_DIR", raising=False)
    assert T.tiktoken_cache_dir() == str(Path(tempfile.gettempdir()) / "data-gym-cache")
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", "/gym")
    assert T.tiktoken_cache_dir() == "/gym"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "/tik")
    assert T.tiktoken_cache_dir() == "/tik"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    assert T.tiktoken_cache_dir() == ""


def test_half_a_question_answer_pair_is_reported_not_dropped_silently(tmp_path):
    """A manifest row with a question but an empty answer (or the reverse), or a jsonl 'qa' entry
    without its "a", was dropped without a word: the user's QA examples vanished. Each is a
    warning naming the row; the file and its other text are kept."""
    (tmp_path / "manifest.csv").write_text("file,question,answer\n"
                                           "a.wav,what is it?,a dog\n"
                                           "b.wav,what is it?,\n"
                                           "c.wav,,  a cat \n")
    problems = []
    rows = P.read_manifest(tmp_path, lambda where, why, kept=False: problems.append((where, why,
                                                                                     kept)))
    assert [r["qa"] for r in rows.values()] == [[{"q": "what is it?", "a": "a dog"}], [], []]
    assert problems == [
        (f"{tmp_path}/manifest.csv:3", "manifest row has a question but no answer; the pair is "
                                       "ignored", True),
        (f"{tmp_path}/manifest.csv:4", "manifest row has an answer but no question; the pair is "
                                       "ignored", True)]
    (tmp_path / "manifest.jsonl").write_text(
        '{"file": "a.wav", "qa": [{"q": "what?", "a": "x"}, {"q": "why?"}, "loose"]}\n')
    problems = []
    rows = P.read_manifest(tmp_path, lambda where, why, kept=False: problems.append((where, why,
                                                                                     kept)))
    assert [r["qa"] for r in rows.values()] == [[{"q": "what?", "a": "x"}]]
    assert [(where.rsplit(":", 1)[1], why.split(" lacks")[0], kept)
            for where, why, kept in problems] == [
        ("1", "a 'qa' entry {\"q\": \"why?\"}", True), ("1", "a 'qa' entry \"loose\"", True)]
