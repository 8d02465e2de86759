"""The codec: the pretrained EnCodec found, downloaded or refused (all without a network; audio.py),
and the offline codec fitted on the corpus (codec.py): its analytic start against a numpy
reference, its training and resume, and the readers of what the labels say."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import audio as A
import codec as C
import synth as Y

SR = A.SAMPLE_RATE


def fake_encodec_checkpoint(path):
    """A checkpoint file in EnCodec 24 kHz's own format, from a seeded random model (the real one is
    a download)."""
    model = A.offline_codec(seed=7)
    torch.save(model.state_dict(), path)
    return model


def fake_model_from(path):
    """The offline codec with the weights of a checkpoint fake_encodec_checkpoint wrote."""
    model = A.offline_codec(seed=0)
    model.load_state_dict(torch.load(path, weights_only=True))
    return model


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_download_goes_through_encodecs_loader_into_the_hub_cache(hub, monkeypatch):
    calls = []
    # torch.hub's downloader, without the network
    def download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix))
        fake_encodec_checkpoint(dst)
    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    model, weights = A.get_pretrained_codec()
    # EnCodec's URL and hash check
    assert calls and calls[0][0].endswith(A.CODEC_FILE) and calls[0][1] == "d7cc33bc"
    assert weights == hub / A.CODEC_FILE and weights.is_file()
    assert same_weights(model, fake_model_from(weights))
    # the next run finds it in the cache (the checksum check is EnCodec's; our fake file needs it
    # patched)
    monkeypatch.setattr("encodec.model._check_checksum", lambda file, checksum: None)
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: pytest.fail("downloaded twice"))
    again, where = A.get_pretrained_codec()
    assert where == weights and same_weights(again, model)


def test_failed_download_falls_back_with_one_line(hub, monkeypatch, capsys):
    def no_network(*a, **k):
        raise OSError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    assert A.get_pretrained_codec() == (None, None)
    # our one line, torch.hub's own "Downloading: " line aside
    out = [l for l in capsys.readouterr().out.splitlines() if not l.startswith("Downloading: ")]
    assert (len(out) == 1 and "downloading EnCodec's weights failed" in out[0]
            and "name resolution" in out[0])
    with pytest.raises(SystemExit, match="--strict"):
        A.get_pretrained_codec(strict=True)


def test_offline_never_tries_to_download(hub, monkeypatch, capsys):
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: pytest.fail("tried to download"))
    assert A.get_pretrained_codec(offline=True) == (None, None)
    assert capsys.readouterr().out == ""


def test_codec_dir_and_corrupt_files(tmp_path, hub, monkeypatch, capsys):
    monkeypatch.setattr("encodec.model._check_checksum", lambda file, checksum: None)
    d = tmp_path / "weights"
    d.mkdir()
    want = fake_encodec_checkpoint(d / A.CODEC_FILE)
    model, where = A.get_pretrained_codec(codec_dir=d, offline=True)
    assert where == d / A.CODEC_FILE and same_weights(model, want)
    with pytest.raises(FileNotFoundError, match=A.CODEC_FILE):
        # --codec_dir without the file
        A.get_pretrained_codec(codec_dir=tmp_path, offline=True)
    hub.mkdir(parents=True)
    fake_encodec_checkpoint(hub / A.CODEC_FILE)
    with pytest.raises(FileNotFoundError, match=A.CODEC_FILE):
        # a wrong --codec_dir is an error, not passed over for the weights in the hub cache
        A.find_codec_weights(tmp_path)
    assert A.find_codec_weights(None) == hub
    (d / A.CODEC_FILE).write_bytes(b"not a checkpoint")
    # named by --codec_dir, where nothing is downloaded: an error, not the offline codec
    with pytest.raises(ValueError, match=f"--codec_dir={d}: {d / A.CODEC_FILE}: unusable"):
        A.get_pretrained_codec(codec_dir=d, offline=True)
    # in the hub cache: one line, then the offline codec
    (hub / A.CODEC_FILE).write_bytes(b"not a checkpoint")
    assert A.get_pretrained_codec(offline=True) == (None, None)
    out = capsys.readouterr().out.strip().splitlines()
    assert (len(out) == 1 and str(hub / A.CODEC_FILE) in out[0] and "unusable" in out[0]
            and "delete it" in out[0]), out


def test_data_of_the_pretrained_codec_with_its_weights_cut(tmp_path, hub):
    # sample.py reads the codec by load_codec: a corrupt weights file is one line naming it
    d = tmp_path / "weights"
    d.mkdir()
    (d / A.CODEC_FILE).write_bytes(b"\0" * 100)  # fails encodec's own checksum
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps(
        {"codec": {"pretrained": True, "weights": str(d / A.CODEC_FILE)}}))
    with pytest.raises(ValueError, match=f"{d / A.CODEC_FILE}: unusable .*delete it"):
        A.load_codec(data)
    (data / "meta.json").write_text(json.dumps({"n_mels": 64}))  # no codec record at all
    with pytest.raises(ValueError, match="without the codec's record prepare.py writes"):
        A.load_codec(data)


def test_an_offline_codec_unfitted_or_of_another_layout_is_refused(tmp_path):
    """load_codec reads an offline codec.pt (codec_state of the model) back into the same weights;
    one never fitted, or whose keys are not this audio.py's offline codec (a key too many, or one
    missing), is a ValueError naming the file, not a model with some weights left random."""
    state = C.codec_state(C.dct_init(A.offline_codec()))
    (tmp_path / "meta.json").write_text(json.dumps(
        {"codec": {"pretrained": False, "weights": "codec.pt", "name": "offline"}}))

    def save(model_state, fitted=True):
        torch.save({"model": model_state, "fitted": fitted}, tmp_path / "codec.pt")

    save(state)
    got = A.load_codec(tmp_path).state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items())
    save(state, fitted=False)
    with pytest.raises(ValueError, match="codec.pt: the offline codec's codebooks were never"):
        A.load_codec(tmp_path)
    save({**state, "decoder.model.99.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"codec.pt: does not match .* unexpected \['decoder"):
        A.load_codec(tmp_path)
    save({k: v for k, v in state.items() if k != "decoder.model.0.conv.conv.bias"})
    with pytest.raises(ValueError, match=r"missing \['decoder.model.0.conv.conv.bias', "):
        A.load_codec(tmp_path)


def test_loading_the_offline_codec_leaves_the_random_stream(synth_dir):
    # sample.py seeds torch, then a hybrid's sample() loads the codec before drawing its tokens
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    A.load_codec(synth_dir)
    assert torch.equal(torch.rand(3), want)


def test_a_truncated_download_in_the_cache_fails_the_real_checksum(hub, capsys):
    hub.mkdir(parents=True)
    (hub / A.CODEC_FILE).write_bytes(b"\0" * 100)
    assert A.get_pretrained_codec(offline=True) == (None, None)
    assert "unusable" in capsys.readouterr().out


def test_readers_read_the_corpus_labels_from_clean_audio():
    rng = lambda i: np.random.default_rng([5, i])
    notes = [Y.make_music(rng(i), 3.0) for i in range(60)]
    notes = [(w, info) for w, info in notes if info["labels"]["form"] == "note"
             and info["labels"]["instrument"] != "bell"]
    assert len(notes) >= 5 and all(C.read_note(w) == info["labels"]["pitch"] for w, info in notes)
    assert all(C.read_morse(w) == info["transcript"]
               for w, info in (Y.make_morse(rng(i), 3.0) for i in range(10)))
    assert all(C.read_dtmf(w) == info["labels"]["digits"]
               for w, info in (Y.make_dtmf(rng(i), 3.0) for i in range(10)))
    # a tone a semitone up reads as the next note
    w = Y.tone("sine", Y.midi_hz(61), 1.0, None)
    assert C.read_note(w) == "C#4" and C.read_note(Y.tone("sine", Y.midi_hz(60), 1.0, None)) == "C4"


def test_readers_debounce_clicks_and_dropouts_under_10_ms():
    """A click of 4 ms in a DTMF gap, or a dropout of 4 ms inside a Morse dash, is not a symbol:
    the readers still read the clip; at 20 ms (shorter than any symbol of the corpus, longer than
    the debounce) the click does count as a key."""
    rng = lambda i: np.random.default_rng([7, i])
    wav, info = Y.make_dtmf(rng(0), 3.0)
    runs = [(a, b) for on, a, b in C.envelope_runs(wav) if on]
    gap = (runs[0][1] + runs[1][0]) // 2                   # the middle of the first gap
    for ms, digits in ((4, info["labels"]["digits"]), (20, None)):
        clicked = wav.copy()
        n = int(ms / 1000 * SR)
        clicked[gap:gap + n] = wav[runs[0][0]:runs[0][0] + n]  # a piece of the first tone
        read = C.read_dtmf(clicked)
        assert (read == digits) if digits else (len(read) == len(info["labels"]["digits"]) + 1)
    wav, info = Y.make_morse(rng(1), 3.0)
    # the longest mark: a dash
    dash_len, dash_start = max((b - a, a) for on, a, b in C.envelope_runs(wav) if on)
    mid = dash_start + dash_len // 2
    cut = wav.copy()
    cut[mid:mid + int(0.004 * SR)] = 0
    assert C.read_morse(cut) == info["transcript"]


def test_goertzel_power_is_the_squared_dft_magnitude():
    """A cosine of amplitude a at a whole number of cycles over n samples has one DFT bin of
    magnitude a n / 2: its power is (a n / 2) ** 2, and ~0 at another whole-cycle frequency."""
    n, a = 2400, 0.5                                   # 0.1 s: 1000 Hz is 100 whole cycles
    x = a * np.cos(2 * np.pi * 1000 * np.arange(n) / SR)
    assert C.goertzel_power(x, 1000) == pytest.approx((a * n / 2) ** 2, rel=1e-9)
    assert C.goertzel_power(x, 1500) < 1e-12 * (a * n / 2) ** 2


def test_read_morse_takes_a_gap_over_2_units_as_between_letters():
    """Gaps of 2.5 units (nearer a letter gap's 3 than a symbol gap's 1) between letters: "sos"
    reads as three letters, not as one symbol of nine dots; marks of 2.5 units are dashes."""
    u = int(0.05 * SR)
    dot, sym_gap, letter_gap = [1] * u, [0] * u, [0] * (5 * u // 2)
    s = dot + sym_gap + dot + sym_gap + dot
    o = [1] * 3 * u + sym_gap + [1] * 3 * u + sym_gap + [1] * 3 * u
    env = np.array([0] * u + s + letter_gap + o + letter_gap + s + [0] * u, np.float64)
    x = env * np.sin(2 * np.pi * 600 * np.arange(len(env)) / SR)
    assert C.read_morse(x) == "sos"
    # marks of 2.5 units (a dash shortened by a lossy codec, nearer 3 than 1) read as dashes
    short_dash = [1] * (5 * u // 2)
    env = np.array([0] * u + short_dash + sym_gap + short_dash + sym_gap + short_dash + [0] * u,
                   np.float64)
    assert C.read_morse(env * np.sin(2 * np.pi * 600 * np.arange(len(env)) / SR)) == "o"


def lowpass_by_blocks(x, bins=C.DCT_BINS, n=A.HOP):
    """The reference for dct_init: each block of n samples replaced by its least-squares fit by
    the first `bins` cosines cos(pi (j + 1/2) k / n), computed in numpy, block by block."""
    j = np.arange(n)
    basis = np.cos(np.pi * (j[:, None] + 0.5) * np.arange(bins)[None] / n)   # (n, bins)
    blocks = x.reshape(-1, n).T
    coef = np.linalg.lstsq(basis, blocks, rcond=None)[0]
    return (basis @ coef).T.reshape(-1)


def test_dct_init_is_the_block_lowpass_and_keeps_the_architecture():
    """decode(encode(x)) of the analytic start equals the block-wise cosine fit (float32 rounding
    apart), on noise and tones; a tone below 4.8 kHz passes and keeps its pitch, one above is
    removed; the state dict is EnCodec 24 kHz's, so pretrained weights still load into it."""
    rng = np.random.default_rng(0)
    t = np.arange(30 * A.HOP) / SR
    x = (0.3 * rng.standard_normal(len(t)) * np.exp(-t) + 0.4 * np.sin(2 * np.pi * 440 * t)
         ).astype(np.float32)
    model = C.dct_init(A.offline_codec())
    y = C.reconstruct(model, [x], quantized=False)[0]
    assert np.abs(y - lowpass_by_blocks(x)).max() < 1e-4
    low = (0.5 * np.sin(2 * np.pi * 1234.5 * t)).astype(np.float32)
    high = (0.5 * np.sin(2 * np.pi * 7000.0 * t)).astype(np.float32)
    y_low, y_high = C.reconstruct(model, [low, high], quantized=False)
    rms = lambda z: float(np.sqrt(np.mean(z ** 2)))
    assert rms(y_low - low) < 0.02 * rms(low) and rms(y_high) < 0.1 * rms(high)
    note = Y.tone("sawtooth", Y.midi_hz(57), 1.0, np.random.default_rng(1)) * 0.5
    assert C.read_note(C.reconstruct(model, [note], quantized=False)[0]) == "A3"
    fresh = A.offline_codec(seed=3).state_dict()
    assert {k: v.shape for k, v in model.state_dict().items()} == \
        {k: v.shape for k, v in fresh.items()}
    model.load_state_dict(fresh)                           # a pretrained checkpoint drops in


def test_codec_report_reads_codebook_0_alone_and_the_untrained_decoder_unquantized():
    """codec_report on the analytic codec with codebook 1 holding every probe frame exactly and
    codebook 0 all zeros: 6 kbps decodes the notes (all read), codebook 0 alone decodes silence
    (none read), and the untrained decoder, fed the encoder's output unquantized, scores the log-mel
    L1 of the exact codes. The probes: single notes of the harmonic instruments only, and "any"
    clips that are not the corpus's own (seed + 1)."""
    seed = 2
    probes = C.codec_probes(seed, n_notes=3, n_morse=1, n_dtmf=1, n_any=2, max_dur=1.0,
                            speech=False)
    assert all(info["labels"]["form"] == "note" and info["labels"]["instrument"] != "bell"
               for _, info in probes["note"])
    assert not any(np.array_equal(w, Y.synth_clip(seed, j, 1.0, speech=False)[0])
                   for j, (w, _) in enumerate(probes["any"]))
    model = C.dct_init(A.offline_codec())
    emb = torch.cat(A.encode_emb(model, [w for v in probes.values() for w, _ in v]))
    C.fit_codebooks(model, emb, iters=1, quiet=True)   # fewer frames than codes: each one kept
    with torch.no_grad():
        layers = [layer._codebook for layer in model.quantizer.vq.layers]
        layers[1].embed.copy_(layers[0].embed)
        layers[0].embed.zero_()
    r, rec = C.codec_report(model, probes, untrained=C.dct_init(A.offline_codec()))
    assert r["notes"] == 1.0 and r["notes_codebook0"] == 0.0
    # the exact codes keep the Morse word and the DTMF digits too, each read from its own clip
    assert r["morse"] == 1.0 and r["dtmf"] == 1.0
    # mel_l1: the mean over the "any" clips of each one's mean log-mel L1 to its reconstruction
    assert all(len(y) == len(w) for k in probes for y, (w, _) in zip(rec[k], probes[k]))
    want = np.mean([np.abs(A.log_mel(y) - A.log_mel(w)).mean()
                    for y, (w, _) in zip(rec["any"], probes["any"])])
    assert 0.01 < r["mel_l1"] == pytest.approx(want, rel=1e-5)
    assert r["mel_l1_untrained"] == pytest.approx(r["mel_l1"], abs=1e-3)
    assert r["clips"] == {"note": 3, "morse": 1, "dtmf": 1, "any": 2}


def brute_nearest(x, means):
    """Reference for assign_nearest: squared distances to every centroid, by subtraction, in
    float64; argmin takes the first of equal minima."""
    d = ((x.double()[:, None] - means.double()[None]) ** 2).sum(-1)
    return d.argmin(1), d.min(1).values


def test_assign_nearest_is_the_brute_force_argmin_with_ties_to_the_lowest_index():
    """Random data, in chunks that do not divide it: the index of the nearest centroid and the
    squared distance to it; on integer data (exact in float32, so ties are exact) with a repeated
    centroid and equidistant points, a tie goes to the lowest index, as torch.min's does."""
    g = torch.Generator().manual_seed(0)
    x, means = torch.randn(500, 8, generator=g), torch.randn(37, 8, generator=g)
    want, dist = brute_nearest(x, means)
    for chunk in (8192, 64):
        got, got_dist = C.assign_nearest(x, means, chunk=chunk, return_dist=True)
        assert torch.equal(got, want) and torch.equal(C.assign_nearest(x, means, chunk=chunk), got)
        assert torch.allclose(got_dist.double(), dist, atol=1e-4)
    means = torch.randint(-2, 3, (10, 3), generator=g).float()
    means[7] = means[2]
    x = torch.cat([torch.randint(-3, 4, (400, 3), generator=g).float(), means[[7, 2]],
                   (means[[1]] + means[[4]]) / 2])    # ties: both copies of 2, 1 against 4
    want, dist = brute_nearest(x, means)
    ties = ((((x[:, None] - means[None]) ** 2).sum(-1) == dist.float()[:, None]).sum(1) > 1)
    assert ties.sum() > 20 and 7 not in want.tolist()
    got, got_dist = C.assign_nearest(x, means, chunk=100, return_dist=True)
    assert torch.equal(got, want) and torch.equal(got_dist.double(), dist)


def test_kmeans_finds_the_blobs_and_is_a_weighted_lloyd_fixed_point():
    """Four well-separated Gaussian blobs (std 0.5, 10 apart), some points repeated (kmeans works on
    distinct rows weighted by their count, which must equal running on the repeats): after enough
    iterations each centroid is the mean of the points (repeats included) whose brute-force nearest
    centroid it is, counts are those points' numbers, the inertia never rises with more iterations
    and falls below the seeded start's, and the best of four seeds puts one centroid on each blob's
    sample mean (Lloyd's can settle in a local optimum from an unlucky start)."""
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0., 0, 0], [10, 0, 0], [0, 10, 0], [0, 0, 10]])
    label = torch.arange(4).repeat_interleave(torch.tensor([150, 200, 250, 100]))
    x = centres[label] + 0.5 * torch.randn(len(label), 3, generator=g)
    x, label = torch.cat([x, x[:50].repeat(3, 1)]), torch.cat([label, label[:50].repeat(3)])
    inertia = lambda means: float(brute_nearest(x, means)[1].sum())
    best = None
    for seed in range(4):
        curve = [inertia(C.kmeans(x, 4, iters, torch.Generator().manual_seed(seed))[0])
                 for iters in range(5)]
        assert all(b <= a * (1 + 1e-6) for a, b in zip(curve, curve[1:]))
        assert curve[1] < curve[0]
        means, counts = C.kmeans(x, 4, 40, torch.Generator().manual_seed(seed))
        near = brute_nearest(x, means)[0]
        assert torch.equal(counts, torch.bincount(near, minlength=4).float())
        assert torch.allclose(means, torch.stack([x[near == j].mean(0) for j in range(4)]),
                              atol=1e-5)
        if best is None or inertia(means) < inertia(best):
            best = means
    blob_means = torch.stack([x[label == j].mean(0) for j in range(4)])
    d = torch.cdist(blob_means.double(), best.double())
    assert d.min(1).values.max() < 1e-4 and len(set(d.argmin(1).tolist())) == 4
    assert torch.cdist(centres, best).min(1).values.max() < 0.2
    # fewer distinct rows than codes: those rows, with their counts, and spares nothing picks
    x = torch.tensor([[1., 2], [3, 4], [5, 6]]).repeat_interleave(torch.tensor([4, 1, 2]), 0)
    means, counts = C.kmeans(x, 5, 3, torch.Generator().manual_seed(0))
    assert torch.equal(means[:3], x.unique(dim=0)) and counts.tolist() == [4, 1, 2, 0, 0]
    assert torch.equal(C.assign_nearest(x, means), brute_nearest(x, means[:3])[0])


def test_kmeans_restarts_an_empty_cluster_at_the_worst_served_point():
    """Each iteration of kmeans is one weighted Lloyd step from the means of the iterations before
    it, recomputed here by brute force: points to their nearest mean, each mean to its points'
    weighted centroid, and a mean left without points to the point (of the distinct ones, weighted
    by its repeats) farthest from its nearest mean. 1-D integer data and a seed under which a
    cluster empties at an early iteration, so the restart is checked, not only the common step;
    repeats such that the weighted farthest point differs from the unweighted one."""
    x = torch.tensor([25., 9, 9, 9, 4, 4, 4, 4, 20, 20, 20, 20, 21, 21, 21, 15, 15, 15, 14,
                      5])[:, None]
    pts, inv = torch.unique(x, dim=0, return_inverse=True)
    w = torch.bincount(inv).double()
    restarts = 0
    for iters in range(1, 6):
        prev = C.kmeans(x, 4, iters - 1, torch.Generator().manual_seed(0))[0].double()
        near, dist = brute_nearest(pts, prev)
        want = prev.clone()
        empty = []
        for j in range(4):
            if (near == j).any():
                m = near == j
                want[j] = (pts.double()[m] * w[m, None]).sum(0) / w[m].sum()
            else:
                empty.append(j)
        worst = torch.argsort(dist * w, descending=True)[:len(empty)]
        for j, i in zip(empty, worst):
            want[j] = pts[i].double()
        got = C.kmeans(x, 4, iters, torch.Generator().manual_seed(0))[0].double()
        if len(empty) <= 1:  # (the order among several restarted means is the code's choice)
            assert torch.allclose(got, want, atol=1e-5), (iters, got.flatten(), want.flatten())
            restarts += len(empty)
    assert restarts >= 1  # a checked iteration restarted a cluster


def test_fit_codebooks_fits_each_layer_on_the_residual_the_quantizer_encodes():
    """fit_codebooks on clustered random encoder outputs, then EnCodec's own quantizer: its codes
    are those of a brute-force residual search over the fitted codebooks (layer i picks the nearest
    codeword to what layers 0..i-1 left), each layer's codebook holds its own codes' centroids
    (k-means of that residual), and decoding the first 1, 2, 4, 8 codebooks leaves less and less
    of the input (a layer fitted on the raw input instead of the residual would add error)."""
    g = torch.Generator().manual_seed(0)
    n, k = 8000, 1024  # ~8 rows per codeword, so k-means clusters every layer
    emb = 3 * torch.randn(40, 128, generator=g)[torch.randint(40, (n,), generator=g)] \
        + torch.randn(n, 128, generator=g)
    model = A.offline_codec(seed=0)
    C.fit_codebooks(model, emb, iters=3, seed=0)
    layers = [layer._codebook.embed for layer in model.quantizer.vq.layers[:A.N_Q]]
    assert all(cb.shape == (k, 128) for cb in layers)
    codes = A.quantize(model, emb)                                    # (n, N_Q), EnCodec's encode
    residual, errors = emb.clone(), []
    for i, cb in enumerate(layers):
        near = torch.cdist(residual.double(), cb.double()).argmin(1)  # brute force, float64
        assert (near == codes[:, i]).float().mean() > 0.999, i      # float ties may flip a few
        used = codes[:, i].unique()
        centroids = torch.stack([residual[codes[:, i] == j].mean(0) for j in used[:50]])
        # 3 Lloyd steps from the last assignment: each code's centroid, up to one more step
        assert (centroids - cb[used[:50]]).norm(dim=1).mean() < 0.2 * residual.norm(dim=1).mean()
        residual = residual - cb[codes[:, i]]
    with torch.no_grad():
        for n_q in (1, 2, 4, A.N_Q):
            dec = model.quantizer.decode(codes[:, :n_q].T[:, None])[0].T   # (n, 128)
            errors.append(float((dec - emb).pow(2).mean()))
    assert all(b < 0.9 * a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] == pytest.approx(float(residual.pow(2).mean()), rel=1e-4)


def test_calibrate_standardises_the_encoder_and_leaves_decode_of_encode_unchanged():
    """On the analytic start (dct_init, as prepare.py calibrates it): calibrate returns the
    encoder outputs it was given standardised per channel by their mean and sample std (numpy, in
    float64); the calibrated encoder gives exactly those on the same clips, and the same map of the
    old encoder's outputs on other clips; and the decoder, with the inverse folded into its first
    conv, turns the calibrated encoder's outputs into the same audio as before (1e-5 on audio of
    amplitude ~0.5)."""
    model = C.dct_init(A.offline_codec())
    rng = np.random.default_rng(0)
    dur = lambda frames: frames * A.HOP / SR
    fit = [0.3 * rng.standard_normal(8 * A.HOP).astype(np.float32),
           Y.tone("sawtooth", Y.midi_hz(57), dur(8), rng).astype(np.float32) * 0.5]
    held = [0.2 * rng.standard_normal(6 * A.HOP).astype(np.float32),
            Y.tone("square", Y.midi_hz(64), dur(6), rng).astype(np.float32) * 0.5]
    emb = torch.cat(A.encode_emb(model, fit))
    old_held = A.encode_emb(model, held)
    old_audio = C.reconstruct(model, held, quantized=False)
    e = emb.double().numpy()
    mean, std = e.mean(0), e.std(0, ddof=1)
    # a real change of scale and offset, so the checks below can fail
    assert np.abs(mean).max() > 0.5 and std.min() < 0.5 < 1.0 < std.max()
    out = C.calibrate(model, emb.clone()).double().numpy()
    assert np.abs(out - (e - mean) / std).max() < 1e-5
    assert np.abs(torch.cat(A.encode_emb(model, fit)).double().numpy() - out).max() < 1e-5
    for new, old in zip(A.encode_emb(model, held), old_held):
        assert np.abs(new.double().numpy() - (old.double().numpy() - mean) / std).max() < 1e-5
    for new, old in zip(C.reconstruct(model, held, quantized=False), old_audio):
        assert np.abs(old).max() > 0.3 and np.abs(new - old).max() < 1e-5


def test_codec_loss_is_a_tenth_of_the_l1_plus_the_multiscale_mel_l1_of_a_numpy_stft():
    """EnCodec's objective against numpy: Hann windows of 2^6 .. 2^11 samples, hop a quarter,
    reflect-padded frames, |FFT| x 4/n (a full-scale sine's peak reads 1), mel filters, then L1 on
    the magnitudes plus L1 on their logs (+1e-3), averaged over the six scales."""
    rng = np.random.default_rng(0)
    t = np.arange(7200) / SR
    x = np.stack([np.sin(2 * np.pi * 440 * t), 0.3 * rng.standard_normal(7200)])
    y = np.stack([0.5 * np.sin(2 * np.pi * 660 * t), 0.01 * rng.standard_normal(7200)])
    want = 0.0
    for n in [2 ** i for i in range(6, 12)]:
        win = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)
        fb = A.mel_filterbank(min(A.N_MELS, n // 8), n).astype(np.float64)

        def mags(z):
            zp = np.pad(z, ((0, 0), (n // 2, n // 2)), mode="reflect")
            starts = range(0, zp.shape[1] - n + 1, n // 4)
            frames = np.stack([zp[:, s:s + n] for s in starts], axis=1)
            return np.abs(np.fft.rfft(frames * win, axis=-1)) * (4.0 / n) @ fb.T

        a, b = mags(x), mags(y)
        want += np.abs(a - b).mean() + np.abs(np.log(a + 1e-3) - np.log(b + 1e-3)).mean()
    want = want / 6 + 0.1 * np.abs(x - y).mean()
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    assert float(C.codec_loss(xt, yt)) == pytest.approx(want, rel=1e-3)
    assert float(C.codec_loss(xt, xt)) == 0.0


def randomise_codebooks(model, g, scale=1.0):
    """Random codewords in the first N_Q codebooks, so that each code decodes to values of its
    own."""
    with torch.no_grad():
        for layer in model.quantizer.vq.layers[:A.N_Q]:
            embed = layer._codebook.embed
            embed.copy_(scale * torch.randn(embed.shape, generator=g))


def test_tune_decoder_trains_the_decoders_learned_parts_on_codes_of_1_2_4_or_8_codebooks():
    """tune_decoder feeds the decoder crops of a clip's quantized encoder output decoded from its
    first 1, 2, 4 or 8 codebooks (each crop one of these, every level drawn over a few steps), and
    changes only the decoder's learned parts: the encoder, the codebooks and the decoder's analytic
    path stay bit-identical. Random codebooks, so that each level decodes to other values."""
    g = torch.Generator().manual_seed(0)
    model = C.dct_init(A.offline_codec())
    randomise_codebooks(model, g)
    wavs = [Y.tone(inst, Y.midi_hz(55 + 4 * i), 0.3, np.random.default_rng(i)) * 0.5
            for i, inst in enumerate(["sine", "square", "sawtooth"])]
    embs = A.encode_emb(model, wavs)
    codes = [A.quantize(model, e).T[:, None] for e in embs]              # (n_q, 1, frames)
    levels = {k: [model.quantizer.decode(c[:k])[0].detach() for c in codes]
              for k in (1, 2, 4, A.N_Q)}
    seen = []
    model.decoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    C.tune_decoder(model, wavs, embs, 8, batch=2, crop_seconds=0.1, quiet=True)
    learned = {id(p) for p in C.learned_parts(model.decoder)}
    free = {k for k, p in model.named_parameters() if id(p) in learned}
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= free and all(k.startswith("decoder.") for k in free)
    drawn = set()
    for z in seen:
        for crop in z:
            n = crop.shape[-1]
            hits = {k for k, qs in levels.items() for q in qs for f in range(q.shape[-1])
                    if torch.equal(crop, torch.nn.functional.pad(q[:, f:f + n],
                                                                 (0, max(0, f + n - q.shape[-1]))))}
            assert len(hits) == 1, hits
            drawn |= hits
    assert len(seen) == 8 and drawn == {1, 2, 4, A.N_Q}


def test_offline_codec_trains_its_learned_parts_only_and_resumes(tmp_path, monkeypatch):
    """train_codec starts from dct_init and trains the residual branches and LSTMs with
    EnCodec's loss: the loss on a fixed clip falls, the analytic path (every other weight) stays
    bit-identical, and a checkpointed run resumes without retaking a step."""
    torch.manual_seed(0)
    wav = Y.tone("sawtooth", Y.midi_hz(57), 0.35, np.random.default_rng(0)) * 0.5
    wavs = [wav[:int(0.3 * SR) // A.HOP * A.HOP]]       # every crop is this one clip
    losses = []
    loss = C.codec_loss

    def recorded_loss(x, y):
        value = loss(x, y)
        losses.append(float(value.detach()))
        return value

    monkeypatch.setattr(C, "codec_loss", recorded_loss)
    model = A.offline_codec()
    ckpt = tmp_path / "codec_train.pt"
    C.train_codec(model, wavs, 30, lr=1e-3, ckpt=ckpt, quiet=True)
    assert torch.load(ckpt, weights_only=True)["step"] == 30
    assert np.mean(losses[-5:]) < 0.9 * losses[0], losses
    start = C.dct_init(A.offline_codec()).state_dict()
    learned = {id(p) for p in C.learned_parts(model)}
    fixed = [k for k, p in model.named_parameters() if id(p) not in learned]
    assert len(fixed) > 40 and all(torch.equal(model.state_dict()[k], start[k]) for k in fixed)
    assert not all(torch.equal(p, start[k]) for k, p in model.named_parameters()
                   if id(p) in learned)
    # a call with the same budget only loads the checkpoint (no step retaken: no loss computed),
    # one with a budget of 31 takes one step from it
    losses.clear()
    again = A.offline_codec()
    C.train_codec(again, wavs, 30, lr=1e-3, ckpt=ckpt, quiet=True)
    assert same_weights(again, model) and losses == []
    resumed = A.offline_codec()
    C.train_codec(resumed, wavs, 31, lr=1e-3, ckpt=ckpt, quiet=True)
    assert len(losses) == 1 and torch.load(ckpt, weights_only=True)["step"] == 31
    assert not same_weights(resumed, model)


def test_offline_codec_training_state_that_cannot_be_written_stops_in_one_line(tmp_path,
                                                                             monkeypatch):
    """The codec's training state on a full disk (torch.save writes a part, then raises): one line
    naming the file, no part left, the state saved before kept."""
    wav = Y.tone("sawtooth", Y.midi_hz(57), 0.35, np.random.default_rng(0)) * 0.5
    wavs = [wav[:int(0.3 * SR) // A.HOP * A.HOP]]
    ckpt = tmp_path / "codec_train.pt"
    C.train_codec(A.offline_codec(), wavs, 2, lr=1e-3, ckpt=ckpt, quiet=True, save_every=1)
    before = ckpt.read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK part")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")
    monkeypatch.setattr(C.torch, "save", full_disk)
    with pytest.raises(SystemExit) as e:
        C.train_codec(A.offline_codec(), wavs, 4, lr=1e-3, ckpt=ckpt, quiet=True, save_every=1)
    assert f"{ckpt}: cannot be written (RuntimeError:" in str(e.value), str(e.value)
    assert os.listdir(tmp_path) == ["codec_train.pt"] and ckpt.read_bytes() == before


def test_offline_codec_training_draws_new_crops_at_every_step(monkeypatch):
    """Each training step learns from crops of its own, each a whole-frame piece of one of the
    clips (zero padded past its end): a seed fixed for the whole run would show the model the same
    few crops at every step. The optimiser step is left out (only the crops are looked at)."""
    wavs = [Y.tone(inst, Y.midi_hz(50 + 5 * i), 0.6, np.random.default_rng(i)) * 0.5
            for i, inst in enumerate(["sine", "square", "sawtooth", "sine", "square", "sawtooth"])]
    seen = []

    def recorded(x, y):
        seen.append(x.clone())
        return (y - y).abs().mean()

    monkeypatch.setattr(C, "codec_loss", recorded)
    monkeypatch.setattr(C, "codec_step", lambda opt, params, loss: opt.step())
    C.train_codec(A.offline_codec(), wavs, 4, batch=2, crop_seconds=0.04, quiet=True)
    assert len(seen) == 4 and all(x.shape == (2, 3 * A.HOP) for x in seen)
    for x in seen:                      # every crop: clip i from frame f on, zero padded
        for row in x.numpy():
            assert any(np.array_equal(row, np.pad(w[f * A.HOP:f * A.HOP + len(row)],
                                                  (0, max(0, f * A.HOP + len(row) - len(w)))))
                       for w in wavs for f in range(A.n_frames(len(w))))
    assert all(not torch.equal(a, b) for i, a in enumerate(seen) for b in seen[i + 1:])
    # a near-silent crop is drawn again: beside a silent clip, every crop is of the loud one
    x, where = C.random_crops([np.zeros_like(wavs[0]), wavs[0]], 3 * A.HOP, 8,
                              np.random.default_rng(0))
    assert [i for i, _ in where] == [1] * 8 and (x.abs().amax(1) > 0.02).all()


def test_offline_codec_training_killed_and_resumed_ends_as_an_uninterrupted_run(tmp_path,
                                                                                monkeypatch):
    """An interruption mid-training (here at the 5th of 6 steps, after the checkpoint of step 4) and
    a re-run give exactly the weights of an uninterrupted run: the optimiser and schedule are
    restored and each step's crops come from a seed of its own."""
    wavs = [Y.tone("square", Y.midi_hz(60 + 4 * i), 0.8, np.random.default_rng(i)) * 0.5
            for i in range(2)]
    torch.manual_seed(0)
    straight = A.offline_codec()
    C.train_codec(straight, wavs, 6, ckpt=tmp_path / "a.pt", quiet=True, save_every=2)
    calls, loss = [], C.codec_loss

    def dies_at_step_5(x, y):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return loss(x, y)

    monkeypatch.setattr(C, "codec_loss", dies_at_step_5)
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        C.train_codec(A.offline_codec(), wavs, 6, ckpt=tmp_path / "b.pt", quiet=True, save_every=2)
    assert torch.load(tmp_path / "b.pt", weights_only=True)["step"] == 4
    taken = []

    def counted(x, y):
        taken.append(1)
        return loss(x, y)

    monkeypatch.setattr(C, "codec_loss", counted)
    # a fresh process would build a fresh model; it takes steps 5 and 6 only (a retrain from the
    # start would end with the same weights, as the init and each step's crops are seeded)
    resumed = A.offline_codec()
    C.train_codec(resumed, wavs, 6, ckpt=tmp_path / "b.pt", quiet=True, save_every=2)
    assert len(taken) == 2 and same_weights(resumed, straight)


def streamed(stream, codes):
    """codes decoded by stream 8 frames first, then 1, 2, 3, 1, ... at a time, the audio joined."""
    pieces, at = [stream(codes[:8])], 8
    while at < len(codes):
        step = len(pieces) % 3 + 1
        pieces.append(stream(codes[at:at + step]))
        at += step
    return torch.cat(pieces)


def test_streaming_decoder_skips_a_part_only_if_its_bias_is_zero_too():
    """StreamingDecoder passes a 1x1 conv whose weight is the identity, and skips a residual branch
    whose last conv has zero weights, only when the bias is zero as well: the analytic codec
    (dct_init: identity shortcuts, zero branches), with random codebooks and a bias added to one
    shortcut and to another branch's last conv, decoded 8 frames then 1 to 3 at a time, equals
    its decoder run on the whole sequence at once. No corpus needed."""
    g = torch.Generator().manual_seed(0)
    model = C.dct_init(A.offline_codec())
    dec = model.decoder.model
    randomise_codebooks(model, g, scale=0.3)
    with torch.no_grad():
        for conv in (dec[4].shortcut.conv.conv, dec[7].block[-1].conv.conv):
            conv.bias.copy_(0.05 * torch.randn(conv.bias.shape, generator=g))
    codes = torch.randint(0, A.CODEBOOK_SIZE, (20, A.N_Q), generator=g)
    full = A.decode(model, codes)
    stream = A.StreamingDecoder(model)
    got = streamed(stream, codes)
    assert got.shape == full.shape == (20 * A.HOP,)
    assert (got - full).abs().max() < 1e-5 * max(1.0, full.abs().max().item())
    # the rest of the analytic codec is still recognised: 3 identity shortcuts, 3 zero branches
    # and the LSTM skipped
    assert sum(stream.identity.values()) == 3 and sum(stream.zero.values()) == 4


def test_streaming_decoder_on_a_dense_decoder_equals_the_whole_decode():
    """StreamingDecoder on EnCodec's architecture with random weights everywhere (no part to skip:
    the cost of a pretrained EnCodec): every conv keeps its last inputs, every upsampling its
    overlap tail, the LSTM its (h, c) between calls, so decoding 8 frames then 1 to 3 at a time
    equals the decoder run on the whole sequence. The analytic codec's tests cannot see these
    states (its overlaps are zero, its LSTM off). No corpus needed."""
    g = torch.Generator().manual_seed(0)
    model = A.offline_codec()
    randomise_codebooks(model, g)
    codes = torch.randint(0, A.CODEBOOK_SIZE, (24, A.N_Q), generator=g)
    full = A.decode(model, codes)
    stream = A.StreamingDecoder(model)
    got = streamed(stream, codes)
    assert got.shape == full.shape == (24 * A.HOP,)
    assert full[8 * A.HOP:].abs().max() > 1e-3  # the streamed part is not silence
    assert (got - full).abs().max() < 1e-5 * max(1.0, full.abs().max().item())
    assert not any(stream.zero.values()) and not any(stream.identity.values())


def test_streaming_decoder_upsampling_of_another_kernel_equals_the_whole_pass():
    """A transposed conv whose kernel is not twice its stride (EnCodec's upsampling always is) takes
    StreamingDecoder's general path: each call's output overlaps the next by k - stride samples,
    held as a tail. Run on 1 to 3 frames at a time, it equals the causal conv on the whole input,
    for kernels longer and shorter than 2 x stride and one equal to the stride."""
    from encodec.modules.conv import SConvTranspose1d
    g = torch.Generator().manual_seed(0)
    for k, stride in ((5, 2), (3, 2), (4, 4), (7, 3)):
        torch.manual_seed(k * 10 + stride)
        module = SConvTranspose1d(3, 2, k, stride=stride, causal=True)
        x = torch.randn(1, 3, 13, generator=g)
        with torch.no_grad():
            full = module(x)
        stream = A.StreamingDecoder(module)
        pieces, at = [], 0
        while at < x.shape[-1]:
            step = len(pieces) % 3 + 1
            pieces.append(stream._run(module, x[..., at:at + step]))
            at += step
        got = torch.cat(pieces, -1)
        assert got.shape == full.shape == (1, 2, 13 * stride), (k, stride)
        assert (got - full).abs().max() < 1e-5, (k, stride)
