"""
Whisper-GPT (Verma, 2024, arXiv 2412.11449): a generative model of audio that predicts the next
coarse EnCodec token (codebook 0 of the 24 kHz codec, 75 tokens/s) from a hybrid input. At step t:
- the coarse token of step t is embedded, and
- the mel-spectrogram frame of that instant goes through a few lightweight causal decoder blocks
  (in place of a Whisper encoder) to a small vector (32-d);
the two are concatenated (early fusion) and the main causal decoder predicts the token of step t+1.
A deviation of ours, on purpose: step t sees the mel frame of the step before (mel_lag=1),
since frame t's window reaches into the audio of the token being predicted.
With use_mel=False the spectrogram path is gone and this is the token-only GPT baseline (GPT-S/GPT-L
of the paper). The paper gives no depth/width/context: the numbers in the configs are ours.

The file also holds the batch construction from the prepared arrays (load_data, get_batch), the
paper's metrics (evaluate) and audio continuation with a KV cache (generate, sample): the interface
that train.py, sample.py and eval.py use for every model file.
"""

import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F
from tqdm import tqdm

from audio import codec_id
from fused_attention import attention

# -----------------------------------------------------------------------------
# config

@dataclass
class WhisperGPTConfig:
    block_size: int = 256    # context in frames, 3.4 s at 75 frames/s (ours)
    vocab_size: int = 1024   # size of codebook 0 (load_data sets it from meta.json)
    n_layer: int = 4         # main decoder (ours)
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0
    bias: bool = False       # biases in Linear and LayerNorm layers
    use_mel: bool = True     # False: token-only GPT baseline
    n_mels: int = 64         # load_data sets it from meta.json
    mel_n_layer: int = 2     # lightweight causal decoder blocks on the mel frames (ours)
    mel_n_head: int = 4
    mel_n_embd: int = 128
    mel_dim: int = 32        # the per-step spectrogram vector concatenated with the token embedding
    # step t sees mel frame t - mel_lag: frame t's window reaches half a block into the audio of the
    # token step t predicts, and 1 is the smallest lag without that leak (0 = the leaky alignment;
    # docs/whisper_gpt.md). load_data warns when meta.json implies a larger one.
    mel_lag: int = 1
    # data: the clip kinds to train and evaluate on, comma-separated (e.g. "speech" or "music", the
    # two data kinds of the paper's Table 1); "" = every clip. Kept in the checkpoint, so eval.py
    # uses the same subset.
    kinds: str = ""
    # the mels the hybrid trains on: "audio", those of the clip's audio (the paper's), or
    # "codebook0" (ours), those of the clip's codebook 0 decoded alone (prepare.py
    # --codebook0_mel). Only codebook 0 is generated, so "codebook0" is what the model sees of its
    # own output.
    mel_source: str = "audio"
    # the codec whose codes the model learned (audio.codec_id; load_data sets it; "" = unknown, an
    # older checkpoint). An offline codec is fitted to its corpus, so its token ids stand for other
    # sounds than another corpus's codec's: load_data and sample refuse data of another codec.
    codec_id: str = ""

# -----------------------------------------------------------------------------
# the transformer blocks (the same block serves the mel decoder and the main decoder)

class LayerNorm(nn.Module):
    """LayerNorm with an optional bias, as nanoGPT's (the same parameters as nn.LayerNorm's)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)

class CausalSelfAttention(nn.Module):

    def __init__(self, n_embd, n_head, dropout, bias):
        super().__init__()
        assert n_embd % n_head == 0, f"n_embd {n_embd} must be divisible by n_head {n_head}"
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x, cache=None):
        """cache: None, or one of WhisperGPT.new_caches()'s dicts: size, the window; the first call
        adds the k, v buffers (B, H, size, D) and n, how many are filled. graphed_step's dicts hold
        k, v and pos, a (1,) position tensor, instead of n."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k_lens = None
        if cache is not None and "pos" in cache:
            # graphed_step: one step at a position held in a tensor, so every position runs the same
            # kernels. Its key and value go in at pos; the keys past it are masked by length.
            cache["k"].index_copy_(2, cache["pos"], k)
            cache["v"].index_copy_(2, cache["pos"], v)
            k, v, k_lens = cache["k"], cache["v"], (cache["pos"] + 1).expand(B)
        elif cache is not None:
            # KV cache: buffers of the whole window, filled in place (torch.cat would copy the
            # cache at every step)
            n = cache.get("n", 0)
            if "k" not in cache:
                # zeros, not empty: graphed_step passes the whole window, and what lies past its
                # position (which attention ignores) is then defined, not stale memory
                cache["k"] = k.new_zeros(B, self.n_head, cache["size"], C // self.n_head)
                cache["v"] = torch.zeros_like(cache["k"])
            cache["k"][:, :, n:n + T] = k
            cache["v"][:, :, n:n + T] = v
            cache["n"] = n = n + T
            k, v = cache["k"][:, :, :n], cache["v"][:, :, :n]
        # causal with Tq < Tk is aligned bottom-right: the new queries see all cached keys
        y = attention(q, k, v, causal=k_lens is None, k_lens=k_lens)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))

class MLP(nn.Module):

    def __init__(self, n_embd, dropout, bias):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))

class Block(nn.Module):

    def __init__(self, n_embd, n_head, dropout, bias):
        super().__init__()
        self.ln_1 = LayerNorm(n_embd, bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = LayerNorm(n_embd, bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
        x = x + self.mlp(self.ln_2(x))
        return x

# -----------------------------------------------------------------------------
# the model

class WhisperGPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        for field in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "n_mels") + (
                ("mel_n_layer", "mel_n_head", "mel_n_embd") if c.use_mel else ()):
            if getattr(c, field) < 1:
                raise ValueError(f"whisper_gpt: {field}={getattr(c, field)}: must be at least 1")
        if c.use_mel and not 0 < c.mel_dim < c.n_embd:
            raise ValueError(f"whisper_gpt: mel_dim ({c.mel_dim}) must be between 1 and n_embd - 1 "
                             f"({c.n_embd - 1})")
        if not 0 <= c.dropout < 1:
            raise ValueError(f"whisper_gpt: dropout ({c.dropout}) must be at least 0 and under 1")
        if c.use_mel and not 0 <= c.mel_lag < c.block_size:
            raise ValueError(f"whisper_gpt: mel_lag ({c.mel_lag}) must be between 0 and block_size "
                             f"- 1 ({c.block_size - 1})")
        if c.use_mel:
            # mel path: frame -> lightweight causal decoder -> mel_dim vector per step
            self.mel_in = nn.Linear(c.n_mels, c.mel_n_embd, bias=c.bias)
            self.mel_wpe = nn.Embedding(c.block_size, c.mel_n_embd)
            self.mel_h = nn.ModuleList([Block(c.mel_n_embd, c.mel_n_head, c.dropout, c.bias)
                                        for _ in range(c.mel_n_layer)])
            self.mel_ln_f = LayerNorm(c.mel_n_embd, c.bias)
            self.mel_out = nn.Linear(c.mel_n_embd, c.mel_dim, bias=c.bias)
        # early fusion: [token embedding (n_embd - mel_dim) | mel vector (mel_dim)] = n_embd
        self.wte = nn.Embedding(c.vocab_size, c.n_embd - (c.mel_dim if c.use_mel else 0))
        self.wpe = nn.Embedding(c.block_size, c.n_embd)
        self.drop = nn.Dropout(c.dropout)
        self.h = nn.ModuleList([Block(c.n_embd, c.n_head, c.dropout, c.bias)
                                for _ in range(c.n_layer)])
        self.ln_f = LayerNorm(c.n_embd, c.bias)
        # not tied to wte: in the hybrid the token embedding is narrower than the residual stream
        # (the token-only baseline is untied too, so the two differ only in the mel path)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # scaled init of the residual projections (GPT-2)
            if name.endswith("c_proj.weight"):
                n = c.mel_n_layer if name.startswith("mel_") else c.n_layer
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n))
        if c.use_mel:
            # mel_out reads a LayerNorm's output (unit scale per dim): start the mel vector at the
            # token embedding's scale (0.02 per dim), so neither half of the fused input drowns
            # the other
            torch.nn.init.normal_(self.mel_out.weight, mean=0.0, std=0.02 / math.sqrt(c.mel_n_embd))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self):
        return sum(p.numel() for p in self.parameters())

    def shift_mels(self, mels):
        """(B, T, n_mels) frames aligned with the codes -> what each step sees: frame t - mel_lag,
        zeros before the window start."""
        lag = self.config.mel_lag
        if lag == 0:
            return mels
        return F.pad(mels, (0, 0, lag, 0))[:, :mels.size(1)]

    def logits(self, codes, step_mels=None, caches=None, pos0=0):
        """The network proper (openai/whisper's name for it): codes to logits (B, T, vocab_size).
        codes: (B, T) coarse tokens. step_mels: (B, T, n_mels), the frames the steps see, already
        shifted (shift_mels). caches: new_caches()'s per-block dicts, or None. pos0: the position
        of codes[:, 0] in the window; an int, or graphed_step's (1,) position tensor."""
        c = self.config
        B, T = codes.shape
        if torch.is_tensor(pos0):
            pos = pos0  # a captured step's position: read on the device, never by the host
        elif pos0 + T > c.block_size:
            raise ValueError(f"whisper_gpt: sequence of {pos0 + T} frames is longer than "
                             f"block_size {c.block_size}")
        else:
            pos = torch.arange(pos0, pos0 + T, dtype=torch.long, device=codes.device)
        x = self.wte(codes)
        if c.use_mel:
            m = self.mel_in(step_mels.to(self.mel_in.weight.dtype)) + self.mel_wpe(pos)
            for i, block in enumerate(self.mel_h):
                m = block(m, None if caches is None else caches[i])
            m = self.mel_out(self.mel_ln_f(m))
            x = torch.cat([x, m.to(x.dtype)], dim=-1)
        x = self.drop(x + self.wpe(pos))
        n_mel_blocks = c.mel_n_layer if c.use_mel else 0  # the caches of the mel path come first
        for i, block in enumerate(self.h):
            x = block(x, None if caches is None else caches[n_mel_blocks + i])
        return self.lm_head(self.ln_f(x))

    def forward(self, codes, mels=None, targets=None):
        """codes (B, T) coarse tokens, mels (B, T, n_mels) mel frames aligned with the codes (hybrid
        only), targets (B, T) next tokens, -1 = ignore. Returns (logits, loss)."""
        if self.config.use_mel:
            if mels is None:
                raise ValueError("whisper_gpt: this is the hybrid model (use_mel=True); forward "
                                 "needs mels")
            mels = self.shift_mels(mels)
        logits = self.logits(codes, mels)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1),
                                   ignore_index=-1)
        return logits, loss

    def new_caches(self):
        """One dict per block, the mel path's first (as logits reads them), holding size (the
        window); CausalSelfAttention.forward says what the first call adds."""
        n_blocks = (self.config.mel_n_layer if self.config.use_mel else 0) + self.config.n_layer
        return [{"size": self.config.block_size} for _ in range(n_blocks)]

    def graphed_step(self, caches, codes, step_mels, pos0):
        """The one-token decoding step, on caches filled by logits() on the window so far, as a
        function step(codes (B, 1), step_mels (B, 1, n_mels) or None, position) -> logits
        (B, vocab_size).
        The position lives in a tensor, so every step runs the same kernels. On a GPU they are
        captured once in a CUDA graph and replayed: one launch per token instead of one per op,
        since launches bound a small model's decoding there (docs/whisper_gpt.md). Elsewhere the
        step runs eagerly. Built with the first step's inputs: capturing runs that step, writing its
        key and value, which step() then writes again."""
        pos = torch.tensor([pos0], device=codes.device)
        graph_caches = [{"k": cache["k"], "v": cache["v"], "pos": pos} for cache in caches]
        codes_in, mel = codes.clone(), None if step_mels is None else step_mels.clone()
        dev = codes.device.type
        # casts recorded in the graph, not cached by autocast outside it
        amp = torch.autocast(dev, torch.get_autocast_dtype(dev), torch.is_autocast_enabled(dev),
                             cache_enabled=False)

        def run():
            with amp:
                return self.logits(codes_in, mel, graph_caches, pos)[:, -1]

        graph = None
        if codes.is_cuda:
            side = torch.cuda.Stream(codes.device)  # warm-up (kernels built) off the capture
            side.wait_stream(torch.cuda.current_stream(codes.device))
            with torch.cuda.stream(side):
                run()
            torch.cuda.current_stream(codes.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = run()

        def step(new_codes, new_mel, position):
            codes_in.copy_(new_codes)
            if mel is not None:
                mel.copy_(new_mel)
            pos.fill_(position)
            if graph is None:
                return run()
            graph.replay()
            return logits
        return step

    @torch.no_grad()
    def generate(self, codes, mels=None, max_new_tokens=75, temperature=1.0, top_k=None,
                 mel_fn=None, generator=None, cuda_graph=False):
        """Continue the prompt codes (B, T0) (codebook 0) by max_new_tokens tokens with a KV cache.
        Returns (B, T0 + max_new_tokens). temperature 0 = greedy.
        The hybrid takes B = 1, since its generated audio is decoded as one stream. Its mels
        (1, T, n_mels) are the prompt's first T frames, T0 - mel_lag <= T <= T0. Each later mel
        frame j is made once, by mel_fn(seq, j) -> (1, n_mels), when the step that sees it comes;
        seq (1, j + mel_lag + 1) holds the codes so far. The last token is never an input, so
        needs no mel frame.
        A context longer than block_size restarts the window on its last block_size // 2 frames.
        cuda_graph: the one-token steps run as graphed_step; the tokens are the same."""
        c = self.config
        lag = c.mel_lag
        if codes.dim() != 2 or codes.size(1) < 1:
            raise ValueError(f"whisper_gpt.generate: codes {tuple(codes.shape)}: expected a prompt "
                             f"(B, T0) of at least one code")
        if temperature < 0 or (top_k is not None and top_k < 0):
            raise ValueError(f"whisper_gpt.generate: temperature={temperature}, top_k={top_k}: "
                             f"each must be at least 0")
        if c.use_mel:
            if mels is None or mel_fn is None:
                raise ValueError("whisper_gpt.generate: the hybrid model needs the prompt's mels "
                                 "and a mel_fn")
            if codes.size(0) != 1:
                raise ValueError(f"whisper_gpt.generate: the hybrid generates one sequence at a "
                                 f"time (its mel comes from one decoded stream), got a batch of "
                                 f"{codes.size(0)}")
            T0, T = codes.size(1), mels.size(1)
            if not max(1, T0 - lag) <= T <= T0:
                raise ValueError(f"whisper_gpt.generate: {T} prompt mel frames for {T0} codes; "
                                 f"expected {max(1, T0 - lag)} to {T0} (mel_lag={lag})")
        seq = codes
        mel_frames = list(mels.unbind(1)) if c.use_mel else []  # known so far, (B, n_mels) each
        start = max(0, seq.size(1) - c.block_size)  # the window's first step

        def mel_inputs(t0, t1):  # what steps t0..t1-1 see; zeros before `start`, as shift_mels
            z = torch.zeros_like(mel_frames[0])
            return torch.stack([mel_frames[t - lag] if t - lag >= start else z
                                for t in range(t0, t1)], dim=1)

        caches, step = self.new_caches(), None
        logits = self.logits(seq[:, start:], mel_inputs(start, seq.size(1)) if c.use_mel else None,
                             caches)[:, -1]
        # a bar for a long continuation (from 20 s of audio: seconds to minutes on a CPU)
        for i in tqdm(range(max_new_tokens), desc="whisper_gpt: generate", unit="token",
                      leave=False, disable=max_new_tokens < 1500):
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits.float()
                # the largest logit made 0 first (softmax is unchanged): a tiny temperature then
                # cannot overflow the others to inf
                logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
                if top_k:  # draw among the k most likely tokens
                    logits, ids = torch.topk(logits, min(top_k, logits.size(-1)))
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
                if top_k:
                    nxt = ids.gather(-1, nxt)
            seq = torch.cat([seq, nxt], dim=1)
            if i == max_new_tokens - 1:
                break
            t = seq.size(1) - 1  # step that takes the new token as input
            if c.use_mel and t - lag >= len(mel_frames):  # this step sees a generated frame
                assert t - lag == len(mel_frames)
                mel_frames.append(mel_fn(seq, t - lag))
            if t - start >= c.block_size:  # window full: restart it on the recent half
                start = t + 1 - c.block_size // 2
                for cache in caches:  # the same buffers, filled anew (a graphed step reads them)
                    cache["n"] = 0
                logits = self.logits(seq[:, start:],
                                     mel_inputs(start, t + 1) if c.use_mel else None, caches)[:, -1]
                continue
            step_mels = mel_inputs(t, t + 1) if c.use_mel else None
            if cuda_graph:
                step = step or self.graphed_step(caches, nxt, step_mels, t - start)
                logits = step(nxt, step_mels, t - start)
            else:
                logits = self.logits(nxt, step_mels, caches, pos0=t - start)[:, -1]
        return seq

# the names train.py, sample.py and eval.py use
Config = WhisperGPTConfig
Model = WhisperGPT

# -----------------------------------------------------------------------------
# data: random windows of the concatenated clips (nanoGPT style)

def leak_free_lag(meta):
    """Smallest lag such that mel frame t - lag uses no audio after the end of step t's block.
    audio.log_mel centres mel frame i on the middle of its block (sample hop*i + hop/2), so its
    window reaches n_fft/2 - hop/2 samples into the next block (meta.json mel.lookahead_samples if
    given)."""
    hop, n_fft = meta["hop_length"], meta["n_fft"]
    lookahead = meta.get("mel", {}).get("lookahead_samples", n_fft // 2 - hop // 2)
    return max(0, math.ceil(lookahead / hop))

def check_codec(config, data_dir):
    """data_dir's codec (audio.codec_id), or a ValueError when the model learned another's codes."""
    found = codec_id(data_dir)
    if config.codec_id and found != config.codec_id:
        raise ValueError(f"whisper_gpt: the model learned the codes of {config.codec_id}, but "
                         f"{data_dir}'s are codes of {found}: their token ids stand for other "
                         f"sounds. Use data prepared with the model's codec (python prepare.py "
                         f"--codec_from=<the data it was trained on> ...)")
    return found

def select_kinds(data_dir, split, kinds, codes, mel):
    """The frames of the clips of a split whose kind is in kinds, concatenated in clip order (mel
    None: codes only)."""
    path = os.path.join(data_dir, f"{split}_clips.jsonl")
    with open(path) as f:
        clips = [json.loads(line) for line in f if line.strip()]
    present = sorted({clip["kind"] for clip in clips})
    unknown = [k for k in kinds if k not in present]
    if unknown:
        raise ValueError(f"whisper_gpt: kinds={','.join(kinds)}: {path} has no clip of kind "
                         f"{', '.join(unknown)} (its kinds: {', '.join(present)})")
    keep = [clip for clip in clips if clip["kind"] in kinds]
    frames = lambda x: np.concatenate([x[clip["offset"]:clip["offset"] + clip["frames"]]
                                       for clip in keep])
    return frames(codes), None if mel is None else frames(mel)

def read_frames(path, dtype, width):
    """A (frames, width) read-only memmap of a split's .bin file; an empty one (a split with no
    clips, which np.memmap refuses) as 0 frames."""
    if os.path.exists(path) and os.path.getsize(path) == 0:
        return np.zeros((0, width), dtype)
    return np.memmap(path, dtype=dtype, mode="r").reshape(-1, width)

def load_data(data_dir, config, tok=None):
    """Memmaps of both splits' codes and (hybrid only) mels. Sets vocab_size, n_mels and codec_id
    on config from meta.json, refusing data of another codec than a codec_id already set.
    With config.kinds, only the frames of the clips of those kinds, in clip order, copied into
    memory. They are cut from the corpus as prepared, so one codec serves every subset.
    tok is unused (no text here): the interface's argument, as in evaluate and sample."""
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"whisper_gpt: {meta_path} not found: run prepare.py first (or set "
                                f"data_dir)")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except ValueError as e:
        raise ValueError(f"whisper_gpt: {meta_path} is not valid JSON ({e}): re-run "
                         f"prepare.py") from None
    config.vocab_size = meta["codebook_size"]
    config.n_mels = meta["n_mels"]
    config.codec_id = check_codec(config, data_dir)
    lag_needed = leak_free_lag(meta)
    if config.use_mel and config.mel_lag < lag_needed:
        print(f"whisper_gpt: warning: mel_lag={config.mel_lag} but the mel frames of {data_dir} "
              f"see {lag_needed} block(s) ahead: step t sees audio of the token it predicts")
    data = {"meta": meta, "block_size": config.block_size, "use_mel": config.use_mel}
    kinds = [k.strip() for k in config.kinds.split(",") if k.strip()]
    mel_file = {"audio": "{}_mel.bin", "codebook0": "{}_mel_c0.bin"}.get(config.mel_source)
    if mel_file is None:
        raise ValueError(f"whisper_gpt: mel_source={config.mel_source!r}: expected audio or "
                         f"codebook0")
    for split in ("train", "val"):
        codes = read_frames(os.path.join(data_dir, f"{split}_codes.bin"), np.uint16, meta["n_q"])
        mel = None
        if config.use_mel:
            mel_path = os.path.join(data_dir, mel_file.format(split))
            if not os.path.exists(mel_path):
                how = ("--codebook0_mel" if config.mel_source == "codebook0" else
                       "(it rebuilds what is missing)")
                raise FileNotFoundError(f"whisper_gpt: mel_source={config.mel_source}: {mel_path} "
                                        f"not found: run python prepare.py {how} with "
                                        f"{data_dir}'s arguments")
            mel = read_frames(mel_path, np.float16, meta["n_mels"])
            if len(codes) != len(mel):
                raise ValueError(f"whisper_gpt: {data_dir}/{split}_codes.bin has {len(codes)} "
                                 f"frames but {mel_path} has {len(mel)}")
        # a split without those kinds or too short for one window is refused when it is read
        # (split_frames), so a held-out corpus (prepare.py --val_percent=100) evaluates without a
        # train split
        unusable = None  # why the split cannot be read, or None
        if kinds:
            try:
                codes, mel = select_kinds(data_dir, split, kinds, codes, mel)
            except ValueError as e:
                codes, mel, unusable = codes[:0], None if mel is None else mel[:0], str(e)
        if not unusable and len(codes) < config.block_size + 1:
            unusable = (f"whisper_gpt: {data_dir} split {split}"
                        f"{' kinds ' + config.kinds if kinds else ''} has {len(codes)} frames, "
                        f"fewer than block_size + 1 = {config.block_size + 1} (the model's "
                        f"context): prepare more data, or train with a lower block_size")
        data[split] = {"codes": codes, "mel": mel, "unusable": unusable}
    return data

def split_frames(data, split):
    """How many frames a split has, or the ValueError load_data stored for it (no clip of the
    asked kinds, or fewer than block_size + 1 frames)."""
    if data[split]["unusable"]:
        raise ValueError(data[split]["unusable"])
    return len(data[split]["codes"])

def _windows(data, split, starts):
    T = data["block_size"]
    codes, mel = data[split]["codes"], data[split]["mel"]
    x = np.stack([codes[i:i + T + 1, 0] for i in starts]).astype(np.int64)
    batch = {"codes": torch.from_numpy(x[:, :-1]), "targets": torch.from_numpy(x[:, 1:])}
    if data["use_mel"]:
        batch["mels"] = torch.from_numpy(np.stack([mel[i:i + T]
                                                   for i in starts]).astype(np.float32))
    return batch

def get_batch(data, split, batch_size, rng):
    """batch_size random windows of block_size frames (and the frame after, for the targets):
    codes (B, T), mels (B, T, n_mels) (hybrid), targets (B, T) = codes shifted by one."""
    n = split_frames(data, split)
    return _windows(data, split, rng.integers(0, n - data["block_size"], size=batch_size))

# -----------------------------------------------------------------------------
# evaluation as in the paper: next coarse token on the validation set

EVAL_OPTS = {"batch_size": 16, "max_windows": 0}

# Copied from salmonn.in_eval_mode
def in_eval_mode(model, fn, *args):
    """fn(*args) with the model in eval mode (no dropout), then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        return fn(*args)
    finally:
        model.train(was_training)

@torch.no_grad()
def evaluate(model, data, tok=None, split="val", **opts):
    """NLL (nats/token), accuracy and perplexity of the next coarse token over the split cut into
    windows of block_size + 1 frames at a stride of block_size (neighbours share one frame): every
    frame after the first, up to the last whole window, is scored once, the context restarting at
    each window (the last (n - 1) % block_size frames are left out). In eval mode (the model's mode
    is restored after).
    Options (EVAL_OPTS): batch_size, max_windows (> 0: only the first max_windows windows)."""
    o = eval_options(opts)
    return in_eval_mode(model, _evaluate, model, data, split, o["batch_size"], o["max_windows"])

def eval_options(opts):
    """evaluate()'s options over their defaults, each checked: eval.py checks them too, before any
    data loads."""
    unknown = set(opts) - set(EVAL_OPTS)
    if unknown:
        raise ValueError(f"whisper_gpt.evaluate: unknown option(s) {sorted(unknown)}; known: "
                         f"{sorted(EVAL_OPTS)}")
    o = {**EVAL_OPTS, **opts}
    batch_size, max_windows = o["batch_size"], o["max_windows"]
    if batch_size < 1:
        raise ValueError(f"whisper_gpt.evaluate: batch_size={batch_size}: must be at least 1")
    if max_windows < 0:
        raise ValueError(f"whisper_gpt.evaluate: max_windows={max_windows}: must be at least 0 "
                         f"(0 = all)")
    return o

def _evaluate(model, data, split, batch_size, max_windows):
    device = next(model.parameters()).device
    T = data["block_size"]
    starts = list(range(0, split_frames(data, split) - T, T))
    if max_windows:
        starts = starts[:max_windows]
    nll, correct, count = 0.0, 0, 0
    for b in tqdm(range(0, len(starts), batch_size), desc="whisper_gpt: evaluate", unit="batch",
                  leave=False, disable=len(starts) <= 4 * batch_size):  # a bar when it takes a while
        windows = _windows(data, split, starts[b:b + batch_size])
        batch = {k: v.to(device) for k, v in windows.items()}
        # no targets: the NLL is summed over tokens below, then divided by their count
        logits = model(batch["codes"], batch.get("mels"))[0].float()
        y = batch["targets"]
        nll += F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1),
                               reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
        count += y.numel()
    nll /= count
    return {"nll": nll, "accuracy": correct / count, "ppl": math.exp(nll), "tokens": count}

# -----------------------------------------------------------------------------
# sampling: continue an audio prompt

def incremental_mel(tools, lag):
    """mel_fn for generate: mel frame j of the generated audio, computed once codes up to j + lag
    exist. tools.decoder_stream decodes each code once, as it comes, and keeps the decoder's state,
    so the audio equals that of the whole sequence decoded at once. The mel is taken on the audio
    of codes j - 1 .. j + 1 only: frame j's window (samples 320 j - 160 .. 320 j + 480) lies inside
    it. With lag 0 (the leaky alignment) code j + 1 does not exist yet when frame j is needed, so
    the frame is taken on the audio there is and differs from the training data's."""
    stream, frame_wavs = tools.decoder_stream(), []  # the audio of each code, (320,) each

    def mel_fn(seq, j):
        end = j + lag + 1
        if len(frame_wavs) < end:
            wav = stream(seq[0, len(frame_wavs):end, None].cpu())
            frame_wavs.extend(wav.view(end - len(frame_wavs), -1))
        s = max(0, j - 1)
        wav = torch.cat(frame_wavs[s:j + 2])
        m = torch.as_tensor(np.asarray(tools.mel(wav)), dtype=torch.float32)
        return m[j - s][None].to(seq.device)
    return mel_fn

SAMPLE_OPTS = {"max_new_tokens": 150, "temperature": 1.0, "top_k": 50, "prompt_frames": 0,
               "seed": -1, "cuda_graph": False}

@torch.no_grad()
def sample(model, tok, audio, prompt, tools, **opts):
    """Continue audio["codes"] (T, n_q) by max_new_tokens coarse tokens (75 per second of audio),
    in eval mode (the model's mode is restored after). Options (SAMPLE_OPTS):
    - temperature: 0 = greedy; top_k: 0 = off; seed: -1 = torch's current RNG (sample.py seeds
      torch with its own --seed; whisper_gpt_table.py sets this one);
    - prompt_frames: the last frames of the clip used as the prompt; 0 = as many as fit the context
      (a longer prompt is kept whole in the output, but only its last block_size frames are seen);
    - cuda_graph: generate's one-token steps replayed from a CUDA graph on a GPU.
    Only codebook 0 is generated. Returns {"codes": the continuation (T_new, 1), "prompt_codes":
    the prompt's (T0, 1)}, to be decoded with the first quantizer alone (EnCodec at 0.75 kbps; the
    other codebooks are left out, not zero-filled).
    The prompt's mels are those the model trained on (mel_source), but for its last mel_lag frames:
    their windows reach into the audio after the prompt, so generate makes them from the codes."""
    unknown = set(opts) - set(SAMPLE_OPTS)
    if unknown:
        raise ValueError(f"whisper_gpt.sample: unknown option(s) {sorted(unknown)}; known: "
                         f"{sorted(SAMPLE_OPTS)}")
    o = {**SAMPLE_OPTS, **opts}
    for key, least in (("max_new_tokens", 1), ("temperature", 0), ("top_k", 0),
                       ("prompt_frames", 0), ("seed", -1)):
        if o[key] < least:
            raise ValueError(f"whisper_gpt.sample: {key}={o[key]}: must be at least {least}")
    if not isinstance(o["cuda_graph"], bool):
        raise ValueError(f"whisper_gpt.sample: cuda_graph={o['cuda_graph']!r}: must be True or "
                         f"False")
    if prompt:
        raise ValueError("whisper_gpt.sample: Whisper-GPT continues audio and takes no text prompt")
    c = model.config
    if c.codec_id and getattr(tools, "data_dir", None):  # the prompt's codes are the data's codec's
        check_codec(c, tools.data_dir)
    device = next(model.parameters()).device
    n = o["prompt_frames"] or c.block_size - 1  # (one position left for the first new token)
    codes = audio["codes"][-n:, :1].T.to(device).long()  # (1, T0): codebook 0
    mels = None
    if c.use_mel:
        # the codec's stream decoder starts on the prompt: its first conv reads 7 frames
        least = max(7, c.mel_lag + 1)
        if codes.size(1) < least:
            raise ValueError(f"whisper_gpt.sample: a prompt of {codes.size(1)} frame(s); the "
                             f"hybrid needs at least {least} (7 for the codec's stream decoder, "
                             f"more than mel_lag={c.mel_lag})")
        clip_mel = audio["mel"]
        if c.mel_source == "codebook0":  # the mel of codebook 0 decoded alone, as in training
            clip_mel = torch.as_tensor(np.asarray(tools.mel(tools.decode(audio["codes"][:, :1]))))
        mels = clip_mel[-n:][:codes.size(1) - c.mel_lag][None].to(device).float()
    generator = None
    if o["seed"] >= 0:
        generator = torch.Generator(device=device).manual_seed(o["seed"])
    mel_fn = incremental_mel(tools, c.mel_lag) if c.use_mel else None
    out = in_eval_mode(model, lambda: model.generate(
        codes, mels, max_new_tokens=o["max_new_tokens"], temperature=o["temperature"],
        top_k=o["top_k"] or None, mel_fn=mel_fn, generator=generator, cuda_graph=o["cuda_graph"]))
    return {"codes": out[0, codes.size(1):, None].cpu(),
            "prompt_codes": out[0, :codes.size(1), None].cpu()}
