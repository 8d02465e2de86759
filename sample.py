"""
Sample from a trained model of this repository, whatever its model file.

    python sample.py --out_dir=out/whisper-gpt-quick --clip=3 --max_new_tokens=150 --temperature=0.9 --top_k=50
    python sample.py --out_dir=out/whisper-gpt-quick --audio=my.wav --out=continuation.wav
    python sample.py --out_dir=out/salmonn-stage3 --clip=0 --prompt="Describe the audio in one sentence."

The settings below belong to sample.py. Every other --key=value is an option of the model file's
sample(), typed by its default in the model's SAMPLE_OPTS (listed at the end of --help); a key not
there stops sample.py, which lists the options there are.
A result {"codes": ...} is decoded with the data's EnCodec and written as a wav, with its spectrogram
as a .png beside it; a result {"text": ...} is printed (and written to a .txt --out, or sample.txt in
an --out folder).
"""

import json
import os
import signal
import sys
import time
from contextlib import nullcontext

def interrupted(signum, frame):
    sys.exit("\nsample.py: interrupted; nothing written")

# Ctrl-C: a line, not a traceback (the result is written whole at the end, or not at all); set
# before the imports below, a second or more of them (torch's)
if __name__ == "__main__":
    signal.signal(signal.SIGINT, interrupted)

import numpy as np
import torch

import configurator
import tokenizer as tokenizers
from audio import (FRAME_RATE, MAX_CLIP_SECONDS, SAMPLE_RATE, BadAudio, StreamingDecoder, codec_id,
                   decode, features, load_audio, load_codec, log_mel, plot_mels, whisper_log_mel)
from train import load_checkpoint, load_weights

# -----------------------------------------------------------------------------
out_dir = "out"      # where train.py wrote ckpt.pt
ckpt = ""            # checkpoint path; default out_dir/ckpt.pt
data_dir = ""        # default: the data_dir the checkpoint was trained on
clip = 0             # input: clip number in {split}_clips.jsonl (when audio is not given)
split = "val"
audio = ""           # input: an audio file instead (wav, flac, ...; resampled to 24 kHz)
prompt = ""          # text prompt (for the text-output models)
out = ""             # a .wav for audio results, or a folder for sample.wav (default: out_dir); a
                     # .txt for text results, or a folder for sample.txt (default: printed only)
seed = 1337
device = "auto"      # auto | cpu | cuda | ...
# auto (CUDA: bfloat16 from sm_80 (A100) on, else float16; elsewhere float32) | float32 | bfloat16 | float16
dtype = "auto"
# -----------------------------------------------------------------------------

def fail(msg):
    configurator.fail("sample.py", msg)

class Tools:
    """What a model's sample() may use from the data pipeline: the data's codec and mel function.
    The codec loads on first use."""

    def __init__(self, data_dir):
        self.data_dir = data_dir
        self._codec = None
        self.load_seconds = 0.0  # kept out of the tokens/s figure

    def codec(self):
        if self._codec is None:
            t0 = time.time()
            try:
                self._codec = load_codec(self.data_dir)
            except ValueError as e:  # missing, cut short, or not fitted
                fail(f"codec: {e}")
            self.load_seconds += time.time() - t0
        return self._codec

    def decode(self, codes):
        """codes (T, k) -> wav (T * hop,) float32 at 24 kHz: audio.decode with the data's codec."""
        return decode(self.codec(), codes)

    def decoder_stream(self):
        """A decoder that takes codes a frame or a few at a time and keeps its state between calls:
        the same audio as decode() of the whole sequence, at the cost of the new frames only."""
        return StreamingDecoder(self.codec())

    def mel(self, wav):
        """wav (n,) at 24 kHz -> log-mel (ceil(n / hop), n_mels), as stored in {split}_mel.bin."""
        return log_mel(wav)

def read_meta(data_dir):
    """data_dir's meta.json, or a one-line failure that names it: missing, not JSON, or without the
    fields sample.py reads."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        fail(f"data_dir {data_dir}: no meta.json (the data the model was trained on; set "
             f"--data_dir)")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (ValueError, OSError) as e:
        fail(f"{path}: cannot be read as JSON ({e}); prepare.py writes it")
    missing = [k for k in ("sample_rate", "frame_rate", "n_q", "n_mels")
               if not isinstance(meta, dict) or k not in meta]
    if missing:
        fail(f"{path}: lacks {', '.join(missing)}; prepare.py writes them")
    return meta

def read_rows(path, dtype, width, start, n):
    """Rows start..start+n of a prepared (rows, width) array, as a torch tensor: int64 for codes
    (uint16), float32 for the rest. A missing, cut or mis-sized file is named."""
    if not os.path.isfile(path):
        fail(f"{path} not found (prepare.py writes it)")
    n_rows, extra = divmod(os.path.getsize(path), np.dtype(dtype).itemsize * width)
    if extra or start + n > n_rows:
        fail(f"{path}: {n_rows} rows of {width}{' and a part' if extra else ''}, but the clip's "
             f"rows are {start}..{start + n}: the file is cut or of other data (prepare.py again)")
    rows = np.memmap(path, dtype=dtype, mode="r").reshape(-1, width)[start:start + n]
    return torch.from_numpy(rows.astype(np.int64 if dtype == np.uint16 else np.float32))

def read_clip(data_dir, split, index):
    """The arrays of clip `index` of a split, as prepared (mel; codes where the data has them;
    wmel with prepare.py --whisper_mel), and its line of {split}_clips.jsonl."""
    meta = read_meta(data_dir)
    path = os.path.join(data_dir, f"{split}_clips.jsonl")
    if not os.path.isfile(path):
        fail(f"--split={split}: {path} not found")
    clips = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                clips.append(json.loads(line))
            except ValueError as e:
                fail(f"{path}: line {i} is not JSON ({e}): cut short or edited; prepare.py again")
    if not clips:  # (the range below would read "0..-1")
        fail(f"--split={split}: {path} has no clips (prepare.py --val_percent=0, or a corpus "
             f"of one clip, leaves val empty); try the other --split")
    if not 0 <= index < len(clips):
        fail(f"--clip={index}: {path} has clips 0..{len(clips) - 1}")
    info = clips[index]
    s, n = info["offset"], info["frames"]
    arrays = {"mel": read_rows(os.path.join(data_dir, f"{split}_mel.bin"), np.float16,
                               meta["n_mels"], s, n)}
    if meta.get("codec") is not None:  # prepare.py --no_codes stores none (SALMONN, Pengi read mel)
        arrays["codes"] = read_rows(os.path.join(data_dir, f"{split}_codes.bin"), np.uint16,
                                    meta["n_q"], s, n)
    if "whisper_mel" in meta:  # prepare.py --whisper_mel: for an OpenAI Whisper encoder
        arrays["wmel"] = read_rows(os.path.join(data_dir, f"{split}_wmel.bin"), np.float16,
                                   meta["whisper_mel"]["n_mels"], info["woffset"], info["wframes"])
    return arrays, info

def write_wav(path, wav, sample_rate):
    import soundfile as sf
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with configurator.written_whole(path) as tmp:
        sf.write(tmp, np.clip(np.asarray(wav, dtype=np.float32), -1, 1), sample_rate, format="WAV",
                 subtype="PCM_16")

def write_text(path, text):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with configurator.written_whole(path) as tmp, open(tmp, "w") as f:
        f.write(text + "\n")

if __name__ == "__main__":
    # raw_opts: the model's sample() options, typed and checked once its file is known
    S, raw_opts, _ = configurator.parse("sample.py", sys.argv[1:], globals(), pass_unknown=True)
    globals().update(S)
    if audio and any(a.startswith("--clip=") for a in sys.argv[1:]):
        fail(f"--clip={clip} and --audio={audio}: the input is a clip of the data or a file, not "
             f"both")
    if audio and any(a.startswith("--split=") for a in sys.argv[1:]):  # it picks a clip: unused
        fail(f"--split={split} and --audio={audio}: --split picks a clip of the data (with "
             f"--clip), which --audio replaces; give one or the other")
    if audio and os.path.isdir(audio):  # before the checkpoint is loaded (seconds for a large one)
        fail(f"--audio={audio}: a folder, not an audio file")
    if audio and not os.path.isfile(audio):
        fail(f"--audio={audio}: file not found")
    if prompt and not prompt.strip():  # would be read as a prompt of spaces, not the default
        fail(f"--prompt={prompt!r}: blank; leave it out for the model's default instruction")
    if not -2**63 <= seed < 2**64:  # torch.manual_seed's range (else its "Overflow" traceback)
        fail(f"--seed={seed}: out of the range a torch generator takes (-2**63 to 2**64 - 1)")
    device = configurator.resolve_device("sample.py", device)
    device_type = device.split(":")[0]
    dtype = configurator.resolve_dtype("sample.py", dtype, device)
    ptdtype = getattr(torch, dtype)  # as train.py
    ctx = nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type,
                                                                  dtype=ptdtype)
    torch.manual_seed(seed)

    # the model, rebuilt from the checkpoint with the model file named in it
    if os.path.isfile(out_dir):
        fail(f"--out_dir={out_dir}: a file; --out_dir names a run's folder "
             f"(--out_dir={os.path.dirname(out_dir) or '.'}), --ckpt a checkpoint file")
    ckpt_path = ckpt or os.path.join(out_dir, "ckpt.pt")
    if os.path.isdir(ckpt_path):  # an out_dir given as --ckpt, as eval.py takes it
        ckpt_path = os.path.join(ckpt_path, "ckpt.pt")
    if not os.path.isfile(ckpt_path):
        typos = configurator.misspelt(raw_opts, S)  # e.g. --out_dri, the cause of this
        fail(f"checkpoint {ckpt_path} not found (train one with train.py, or set --out_dir / "
             f"--ckpt)" + (f"; not settings of sample.py: {typos}" if typos else ""))
    try:
        checkpoint = load_checkpoint(ckpt_path)
    except ValueError as e:
        fail(e)
    M = configurator.import_model("sample.py", checkpoint["model_name"])
    config = M.Config(**checkpoint["model_args"])
    model = M.Model(config)
    try:  # weights of another shape than its own model_args say: a one-line failure
        load_weights(model, checkpoint["model"], checkpoint["model_args"],
                     "the checkpoint's model_args")
    except ValueError as e:
        fail(f"{ckpt_path}: {e}")
    model.eval().to(device)
    try:  # before any input is read
        opts = configurator.model_options(raw_opts, M.SAMPLE_OPTS, "sample.py",
                                          f"{M.__name__}.sample", script_settings=S)
    except ValueError as e:  # an unknown option, or a value of the wrong type
        fail(e)
    # a model of codes records their codec (whisper_gpt): it reads and writes codes; the text
    # models read the mel only
    codes_model = hasattr(config, "codec_id")
    new_tokens = {**M.SAMPLE_OPTS, **opts}.get("max_new_tokens", 0)  # text tokens for the others
    if codes_model and new_tokens > MAX_CLIP_SECONDS * FRAME_RATE:  # refused now, not at the end
        fail(f"--max_new_tokens={new_tokens}: {new_tokens / FRAME_RATE:.2f} s of audio, over the "
             f"{MAX_CLIP_SECONDS} s a continuation may last ({MAX_CLIP_SECONDS * FRAME_RATE} "
             f"tokens at {FRAME_RATE} a second; sample.py decodes it whole, as the codec encodes "
             f"a clip: audio.MAX_CLIP_SECONDS)")
    # where the result goes (audio: a .wav, a folder gets sample.wav; text: printed, and with --out
    # a .txt, a folder gets sample.txt); checked before the input is read and sampled
    out_path = out or os.path.join(out_dir, "sample.wav")
    if os.path.isdir(out_path) or out_path.endswith(os.sep):
        out_path = os.path.join(out_path, "sample.wav" if codes_model else "sample.txt")
    if not out_path.lower().endswith((".wav", ".txt")):
        new_folder = "" if os.path.splitext(out_path)[1] or os.path.exists(out_path) else (
            f" (no folder {out} exists: --out={out}{os.sep} makes it)")
        fail(f"--out={out}: audio is written as WAV, text as .txt: name a .wav or .txt file, or a "
             f"folder{new_folder}")
    if codes_model and out_path.lower().endswith(".txt"):
        fail(f"--out={out}: this model's result is audio, written as WAV: name a .wav file or a "
             f"folder")
    if out and not codes_model and out_path.lower().endswith(".wav"):
        fail(f"--out={out}: this model's result is text, written as .txt: name a .txt file or a "
             f"folder")
    # the input is never overwritten: the result's file, nor (audio) its picture next to it
    written = [out_path] + ([os.path.splitext(out_path)[0] + ".png"] if codes_model else [])
    for w in written[1:]:  # (a folder as out_path itself was given its sample.wav above)
        if os.path.isdir(w):
            fail(f"--out={out or out_path}: its picture {w} is a folder; name another file")
    if audio and os.path.isfile(audio) and any(os.path.exists(w) and os.path.samefile(w, audio)
                                               for w in written):
        fail(f"--out={out or out_path}: would write over the input --audio={audio}; name another "
             f"file")
    if codes_model or out:  # a text result without --out is only printed
        out_folder = os.path.dirname(os.path.abspath(out_path))
        configurator.check_folder("sample.py", f"--out={out}" if out else
                                  f"--out (default {out_path})", out_folder)
        try:  # now, not after the sampling, whose result would then be lost
            os.makedirs(out_folder, exist_ok=True)
        except OSError as e:
            fail(f"--out={out or out_path}: its folder {out_folder} cannot be made ({e.strerror})")
    if data_dir and not os.path.isdir(data_dir):  # (the checkpoint's own may be gone: see below)
        fail(f"--data_dir={data_dir}: no such folder")
    data_dir = data_dir or checkpoint["config"]["data_dir"]
    # a text model given --audio needs nothing of the data it trained on, its tokenizer recorded in
    # the checkpoint (as train.py writes them): it runs where that data is gone
    reads_data = codes_model or not audio or not checkpoint.get("tokenizer")
    meta = read_meta(data_dir) if reads_data else {"sample_rate": SAMPLE_RATE}
    print(f"{checkpoint['model_name']} from {ckpt_path} (iter {checkpoint['iter_num']})"
          + (f", data {data_dir}" if reads_data else ""))
    try:
        # None for whisper_gpt
        tok = tokenizers.checkpoint_tokenizer(checkpoint, config, data_dir, ckpt_path)
    except (ValueError, OSError, RuntimeError) as e:
        fail(f"tokenizer: {e}")
    del checkpoint
    # the tokenizer's own marks (<|endoftext|>) are not text: tiktoken's refusal of them is five
    # lines that name neither the setting nor what to do
    for key, text in (("prompt", prompt), ("candidates", opts.get("candidates"))):
        marks = [m for m in (tok.special_tokens_set if tok else ()) if m in str(text or "")]
        if marks:
            fail(f"--{key}={text!r}: holds {', '.join(marks)}, the tokenizer's end-of-text mark, "
                 f"which no text may hold: leave it out")
    tools = Tools(data_dir)
    if audio:
        try:
            # a limit only where the clip is encoded (a model of codes)
            wav = load_audio(audio, MAX_CLIP_SECONDS if meta.get("codec") and codes_model else None)
        except BadAudio as e:
            fail(e)
        if meta.get("codec") is None or not codes_model:  # no codec needed (nor loaded)
            inp = {"mel": torch.as_tensor(log_mel(wav)).float()}
        else:
            codes, mel = features(wav, tools.codec())
            inp = {"codes": torch.as_tensor(codes).long(), "mel": torch.as_tensor(mel).float()}
        if getattr(config, "speech_features", "mel") == "whisper":
            inp["wmel"] = torch.from_numpy(whisper_log_mel(wav))
        print(f"input: {audio}, {len(wav) / meta['sample_rate']:.2f} s")
    else:
        inp, info = read_clip(data_dir, split, clip)
        if not codes_model:  # as from --audio: a text model reads the mel (and Whisper's)
            inp.pop("codes", None)
        print(f"input: {split} clip {clip} ({info['id']}, {info['kind']}, {info['duration']:.2f} s)"
              + (f": {info['caption']}" if info.get("caption") else ""))

    # sample() checks the data's codec: hashing it (~0.1 s, then cached) here counts as loading,
    # kept out of the tokens/s figure
    if codes_model and config.codec_id:
        t = time.time()
        try:
            codec_id(data_dir)
        except ValueError as e:
            fail(f"codec: {e}")
        tools.load_seconds += time.time() - t
    t0, load0 = time.time(), tools.load_seconds
    with ctx:  # (sample() itself runs without gradients)
        try:
            result = M.sample(model, tok, inp, prompt or None, tools, **opts)
        except ValueError as e:  # a bad option value, or a prompt or input the model cannot take
            msg = str(e)
            msg = msg if msg.startswith(M.__name__) else f"{M.__name__}.sample: {msg}"
            fail(msg + (f" (input: --audio={audio}, {len(wav) / meta['sample_rate']:.2f} s)"
                        if audio else ""))
    dt = time.time() - t0 - (tools.load_seconds - load0)  # a codec loaded on the way, left out
    if "codes" in result:
        codes = result["codes"]
        n = codes.shape[0]
        print(f"generated {n} frames ({n / meta['frame_rate']:.2f} s of audio) in {dt:.2f} s: "
              f"{n / dt:.1f} tokens/s")
        prompt_codes = result.get("prompt_codes")
        seam = None  # where the prompt ends, in seconds
        if prompt_codes is not None:  # the prompt too, decoded the same way: one can hear the seam
            if len(prompt_codes) < len(inp["codes"]):  # the input did not all fit
                print(f"prompt: the input's last {len(prompt_codes)} of {len(inp['codes'])} frames "
                      f"(the model's context, or --prompt_frames)")
            codes = torch.cat([prompt_codes, codes])
            seam = len(prompt_codes) / meta["frame_rate"]
        wav = tools.decode(codes)
        png = os.path.splitext(out_path)[0] + ".png"
        try:
            write_wav(out_path, wav.numpy(), meta["sample_rate"])
            plot_mels(png, [(f"{'prompt | continuation' if seam else 'generated'} ({M.__name__}, "
                             f"{codes.shape[1]} codebook(s) decoded)", log_mel(wav.numpy()))],
                      boundary=seam)
        except (OSError, RuntimeError) as e:
            # a full disk, a folder gone meanwhile (soundfile raises a RuntimeError subclass)
            fail(f"--out={out_path}: cannot write it ({e})")
        print(f"wrote {out_path} ({len(wav) / meta['sample_rate']:.2f} s" +
              (f": {seam:.2f} s prompt + {(len(wav) / meta['sample_rate'] - seam):.2f} s "
               f"continuation" if seam else "") +
              f", {codes.shape[1]} codebook(s) decoded) and its log-mel spectrogram {png}")
    else:
        if not prompt and result.get("prompt"):  # the model's default instruction: say which
            print(f"prompt: {result['prompt']} (the model's default; --prompt asks another)")
        print(result["text"])
        print(f"({dt:.2f} s)")
        if out:  # a .txt (checked above)
            try:
                write_text(out_path, result["text"])
            except OSError as e:  # a full disk, a folder gone meanwhile
                fail(f"--out={out_path}: cannot write it ({e})")
            print(f"wrote {out_path}")
