"""audio.py's OpenAI Whisper input features (prepare.py --whisper_mel): against openai-whisper's own
log-mel, stored time-aligned with each clip (and resumed from chunks), and a Whisper checkpoint's
encoder loaded into salmonn.py's SpeechEncoder giving Whisper's outputs on the same features."""
import importlib.machinery
import importlib.util
import json
import sys
import types
from dataclasses import asdict

import numpy as np
import pytest
import torch

import audio as A
import prepare as P
import synth as Y

FAST = ["--quiet", "--kmeans_frames=512", "--kmeans_iters=2", "--offline", "--codec_steps=2",
        "--codec_clips=4", "--codec_tune_steps=1", "--codec_report=0"]


@pytest.fixture(scope="module")
def whisper():
    """openai-whisper's audio and model modules. Its package __init__ imports whisper.timing, which
    imports numba (not installed, and only used for word timings): a stub numba whose jit leaves the
    function as it is stands in while whisper imports; sys.modules is restored afterwards, so other
    tests see no whisper and no numba."""
    if importlib.util.find_spec("whisper") is None:
        pytest.skip("openai-whisper is not installed (pip install --no-deps openai-whisper)")
    saved = {k: v for k, v in sys.modules.items() if k in ("numba", "whisper")
             or k.startswith("whisper.")}
    numba = types.ModuleType("numba")
    numba.jit = lambda *a, **k: a[0] if len(a) == 1 and callable(a[0]) and not k else (lambda f: f)
    sys.modules["numba"] = numba
    try:
        import whisper.audio
        import whisper.model
        yield types.SimpleNamespace(audio=whisper.audio, model=whisper.model)
    finally:
        for k in [k for k in sys.modules if k in ("numba", "whisper") or k.startswith("whisper.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def test_whisper_audio_constants_match_ours(whisper):
    assert whisper.audio.N_FFT == A.WHISPER_N_FFT and whisper.audio.HOP_LENGTH == A.WHISPER_HOP
    assert whisper.audio.SAMPLE_RATE == A.WHISPER_SR


def test_whisper_log_mel_matches_openai_whisper(whisper):
    rng = np.random.default_rng(0)
    n = int(3.37 * 16000)                             # a few seconds, not a whole number of hops
    t = np.arange(n) / 16000
    x = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 2500 * t * (1 + t / 4))
         + 0.05 * rng.normal(size=n)).astype(np.float32)
    # a quiet start, so the 8-decade floor matters somewhere
    x[: 16000 // 2] *= 0.01
    ours = A.whisper_log_mel(x, sr=16000)
    # the same un-padded input
    ref = whisper.audio.log_mel_spectrogram(torch.from_numpy(x)).numpy().T
    assert ours.dtype == np.float32 and ours.shape == ref.shape == (n // 160, 80)
    assert np.abs(ours - ref).max() < 1e-4
    # a clip quiet throughout (its loudest mel under 1e-2): the 8 decades below its peak reach
    # under Whisper's 1e-10 floor, which then decides the quietest bins
    quiet = x * 1e-3
    ref_quiet = whisper.audio.log_mel_spectrogram(torch.from_numpy(quiet)).numpy().T
    assert ref_quiet.max() < 0.5 and ref_quiet.min() == pytest.approx((-10 + 4) / 4)
    assert np.abs(A.whisper_log_mel(quiet, sr=16000) - ref_quiet).max() < 1e-4
    # 24 kHz in (the default): resampled to 16 kHz by audio.resample, then the same
    x24 = A.resample(x, 16000, 24000)
    m24 = A.whisper_log_mel(x24)
    np.testing.assert_array_equal(m24, A.whisper_log_mel(A.resample(x24, 24000, 16000), sr=16000))
    assert abs(len(m24) - len(x24) / 24000 * 100) <= 1
    assert np.abs(m24 - ref).mean() < 0.05            # resampling twice changes little


def test_missing_filters_are_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delitem(A._mel_cache, "wfb", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps openai-whisper"):
        A.whisper_log_mel(np.zeros(24000, np.float32))
    spec = importlib.machinery.ModuleSpec("whisper", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec)
    with pytest.raises(FileNotFoundError) as e:
        A.whisper_log_mel(np.zeros(24000, np.float32))
    assert (str(tmp_path / "assets" / "mel_filters.npz") in str(e.value)
            and "pip install --no-deps" in str(e.value))


def test_prepare_stores_whisper_mel_per_clip_and_resumes(tmp_path, capsys, monkeypatch):
    # the offline codec plays no part here: 16 s saved per run
    monkeypatch.setattr(P, "train_codec", lambda *a, **k: None)
    out = tmp_path / "out"
    base = ["--clips=8", "--max_seconds=1.5", f"--out_dir={out}", "--val_percent=25"] + FAST
    P.main(base)                                      # prepared without it: no Whisper stream
    assert (not list(out.glob("*_wmel.bin"))
            and "whisper_mel" not in json.loads((out / "meta.json").read_text()))
    capsys.readouterr()

    # --whisper_mel is other arguments: the finished output is kept, and --force rebuilds it;
    # interrupted after the audio is encoded, the next run (no --force needed) resumes from the
    # saved chunks, which hold the Whisper features too
    with pytest.raises(SystemExit, match="--whisper_mel=False then, True now"):
        P.main(base + ["--whisper_mel"])
    def crash(*a, **k):
        raise KeyboardInterrupt
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(P, "fit_codebooks", crash)
        P.main(base + ["--whisper_mel", "--force"])
    assert "already prepared" not in capsys.readouterr().out
    chunks = list(out.glob(".work-*/chunk*.npz"))
    assert chunks and all("wmel" in np.load(c) for c in chunks)
    P.main(base + ["--whisper_mel"])
    assert "resuming: 8 clips already encoded" in capsys.readouterr().out

    meta = json.loads((out / "meta.json").read_text())
    assert meta["whisper_mel"]["n_mels"] == 80 and meta["whisper_mel"]["frame_rate"] == 100
    assert meta["whisper_mel"]["sample_rate"] == 16000
    n_clips = 0
    for split in ("train", "val"):
        clips = [json.loads(l) for l in (out / f"{split}_clips.jsonl").read_text().splitlines()]
        wmel = np.memmap(out / f"{split}_wmel.bin", np.float16, mode="r").reshape(-1, 80)
        assert len(wmel) == sum(c["wframes"] for c in clips)
        woff = 0
        for c in clips:
            assert c["woffset"] == woff and abs(c["wframes"] - c["duration"] * 100) <= 2, c
            woff += c["wframes"]
        n_clips += len(clips)
    assert n_clips == 8
    # one clip regenerated from its id: the stored features are whisper_log_mel of its audio
    c = clips[0]
    wav, _ = Y.synth_clip(meta["args"]["seed"], int(c["id"].split("-")[1]),
                          meta["args"]["max_seconds"], speech=not meta["args"]["no_speech"])
    want = A.whisper_log_mel(wav)
    assert want.shape == (c["wframes"], 80)
    np.testing.assert_allclose(wmel[c["woffset"]:c["woffset"] + c["wframes"]].astype(np.float32),
                               want, atol=2e-3)

    # SALMONN reads the stream as prepared: its speech encoder takes Whisper's 80 bins at
    # 100 frames/s
    import salmonn
    import tokenizer
    cfg = salmonn.SALMONNConfig(speech_features="whisper")
    salmonn.load_data(str(out), cfg, tokenizer.load_tokenizer(str(out), "corpus"))
    assert (cfg.speech_n_mels, cfg.speech_frame_rate, cfg.n_mels) == (80, 100.0, 64)

    # the same arguments again: complete, skipped; without the option (and --force): rebuilt, and
    # the stale stream goes
    P.main(base + ["--whisper_mel"])
    assert "already prepared" in capsys.readouterr().out
    P.main(base + ["--force"])
    assert "already prepared" not in capsys.readouterr().out
    assert (not list(out.glob("*_wmel.bin"))
            and "wframes" not in (out / "train_clips.jsonl").read_text())


def test_whisper_checkpoint_loads_into_speech_encoder(whisper, tmp_path):
    import salmonn
    torch.manual_seed(0)
    dims = whisper.model.ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=64,
                                         n_audio_head=2, n_audio_layer=2, n_vocab=128,
                                         n_text_ctx=16, n_text_state=64, n_text_head=2,
                                         n_text_layer=1)
    model = whisper.model.Whisper(dims).eval()
    # random weights everywhere, LayerNorms included
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "tiny-random.pt"
    # the official format
    torch.save({"dims": asdict(dims), "model_state_dict": model.state_dict()}, path)

    sd, d = salmonn.load_whisper_encoder_state(str(path))
    # the sizes, in salmonn's names
    assert d["n_mels"] == 80 and d["n_embd"] == 64
    enc = salmonn.SpeechEncoder(80, 64, 2, 2, 0.0).eval()
    enc.load_state_dict(sd, strict=True)

    # Whisper's encoder takes exactly 3000 frames (30 s)
    mel = torch.randn(1, 80, 3000) * 0.5
    with torch.no_grad():
        ref = model.encoder(mel)
        ours, lens2 = enc(mel.transpose(1, 2), torch.tensor([3000]))
    assert ours.shape == ref.shape == (1, 1500, 64) and lens2.tolist() == [1500]
    assert (ours - ref).abs().max().item() < 1e-4
