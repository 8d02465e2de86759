"""Pengi: prefix layout, frozen parts, loss masking, beam search, candidate ranking, LLM loaders,
BLEU-4, linear probe, and a CPU-sized model that learns a close-ended task of the synth corpus."""

import itertools
import json
import math
import os
import shutil
import sys
import types
from collections import Counter
from dataclasses import asdict

import numpy as np
import pytest
import soundfile
import torch
from torch.nn import functional as F

import pengi
import tokenizer
from script_runner import run_script

pytestmark = pytest.mark.filterwarnings("ignore:pengi. llm_init is empty")


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread avoids the cost of syncing threads (large on a busy
    machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_config(**kw):
    cfg = dict(n_mels=16, vocab_size=50, eot_token=49, max_frames=32, patch_size=4, enc_dim=8,
               enc_depths="2,2", enc_heads="2,2", window=4, d_embed=16, text_n_layer=1,
               prefix_len=3, map_n_layer=1, map_n_head=2, llm_n_layer=2, llm_n_head=2,
               llm_n_embd=16, llm_block_size=64, dropout=0.0)
    cfg.update(kw)
    return pengi.PengiConfig(**cfg)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    return pengi.Pengi(tiny_config(**kw)).eval()


def tiny_batch(cfg, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mel = torch.randn(B, cfg.max_frames, cfg.n_mels, generator=g)
    prompts = [torch.randint(0, cfg.eot_token, (n,), generator=g).tolist() for n in (4, 2, 5)[:B]]
    answers = [torch.randint(0, cfg.eot_token, (n,), generator=g).tolist() for n in (3, 6, 1)[:B]]
    return pengi.collate(list(mel.numpy()), prompts, answers, cfg.eot_token)


def steps_on_one_batch(m, opt, batch, steps):
    """steps optimizer steps of m on one fixed batch."""
    for _ in range(steps):
        _, loss = m(**batch)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_prefix_length_and_order():
    m = tiny_model()
    cfg, k = m.config, m.config.prefix_len
    b = tiny_batch(cfg)
    pre = m.prefix(b["mel"], b["prompt"], b["prompt_lens"])
    assert pre.shape == (3, 2 * k, cfg.llm_n_embd)
    # the first k positions come from the audio alone, the next k from the prompt alone
    pre_other_prompt = m.prefix(b["mel"], b["prompt"].flip(0), b["prompt_lens"].flip(0))
    assert (torch.equal(pre[:, :k], pre_other_prompt[:, :k])
            and not torch.allclose(pre[:, k:], pre_other_prompt[:, k:]))
    pre_other_audio = m.prefix(b["mel"].flip(0), b["prompt"], b["prompt_lens"])
    assert (torch.equal(pre[:, k:], pre_other_audio[:, k:])
            and not torch.allclose(pre[:, :k], pre_other_audio[:, :k]))
    # the LM sees [audio prefix][text prefix][answer]; logits are those of the last prefix
    # position onwards
    logits, _ = m(**b)
    La = b["answer"].size(1)
    assert logits.shape == (3, La + 1, cfg.vocab_size)
    x = torch.cat([m.m1(m.embed_audio(b["mel"])), m.m2(m.embed_text(b["prompt"], b["prompt_lens"])),
                   m.llm.wte(b["answer"])], 1)
    h, _ = m.llm(x)
    assert x.size(1) == 2 * k + La
    torch.testing.assert_close(logits, m.llm.lm_head(h)[:, 2 * k - 1:])
    # the text encoder pools at the last real prompt token: padding after it changes nothing
    p2 = torch.cat([b["prompt"], torch.randint(0, 40, (3, 4))], 1)
    torch.testing.assert_close(m.embed_text(p2, b["prompt_lens"]),
                               m.embed_text(b["prompt"], b["prompt_lens"]))
    # embeddings are L2-normalised
    torch.testing.assert_close(m.embed_audio(b["mel"]).norm(dim=-1), torch.ones(3))


def test_frozen_parts_bit_identical_after_steps():
    m = tiny_model(dropout=0.1).train()
    frozen = {n: p.detach().clone() for n, p in m.named_parameters()
              if n.startswith(("llm.", "text_encoder."))
              and not n.startswith("text_encoder.text_projection.")}
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    # as in the official code: the text tower is frozen, CLIP's text_projection and the projection
    # after it train
    assert trainable and all(n.startswith(("audio_encoder.", "audio_proj.", "m1.", "m2.",
                                           "text_proj.", "text_encoder.text_projection."))
                             for n in trainable)
    assert ("text_encoder.text_projection.weight" in trainable
            and "text_proj.linear1.weight" in trainable)
    assert not any(p.requires_grad for n, p in m.named_parameters() if n in frozen)
    before = {n: p.detach().clone() for n, p in m.named_parameters() if n in trainable}
    params = [p for p in m.parameters() if p.requires_grad]  # as train.py builds its AdamW
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                             lr=1e-2)
    steps_on_one_batch(m, opt, tiny_batch(m.config), 3)
    for n, p in m.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    changed = [n for n in trainable if not torch.equal(dict(m.named_parameters())[n], before[n])]
    assert (any(n.startswith("audio_encoder.") for n in changed)
            and any(n.startswith("m1.") for n in changed))
    assert (any(n.startswith("m2.") for n in changed)
            and "text_encoder.text_projection.weight" in changed)
    # and they run in eval mode while the rest trains, as a frozen pretrained model does (were
    # dropout added to them, it would stay off)
    assert m.training and m.audio_encoder.training and m.m1.training
    assert not any(x.training for x in m.llm.modules()) and not m.text_encoder.training
    m2 = tiny_model(text_trainable=True).train()
    assert m2.text_encoder.training and not m2.llm.training


def test_loss_on_answer_tokens_only():
    m = tiny_model()
    cfg, k = m.config, m.config.prefix_len
    b = tiny_batch(cfg)
    logits, loss = m(**b)
    # targets: each answer then eot, -1 beyond
    for i, n in enumerate((3, 6, 1)):
        assert b["targets"][i, :n].tolist() == b["answer"][i, :n].tolist()
        assert b["targets"][i, n].item() == cfg.eot_token and (b["targets"][i, n + 1:] == -1).all()
    # manual loss over the answer positions of the full sequence: each example's mean NLL, then
    # their mean
    x = torch.cat([m.prefix(b["mel"], b["prompt"], b["prompt_lens"]), m.llm.wte(b["answer"])], 1)
    h, _ = m.llm(x)
    full = F.log_softmax(m.llm.lm_head(h), -1)  # position t predicts token t+1
    per_example, count = [], 0
    for i, n in enumerate((3, 6, 1)):
        seq = b["answer"][i, :n].tolist() + [cfg.eot_token]
        per_example.append(-sum(full[i, 2 * k - 1 + j, tok].item()
                                for j, tok in enumerate(seq)) / len(seq))
        count += len(seq)
    assert count == int((b["targets"] != -1).sum())
    assert math.isclose(loss.item(), sum(per_example) / 3, rel_tol=1e-5)
    # padded answer tokens (after each answer's eot target) do not change the loss
    b2 = dict(b)
    b2["answer"] = b["answer"].clone()
    b2["answer"][2, 1:] = 7
    b2["answer"][0, 3:] = 11
    assert math.isclose(m(**b2)[1].item(), loss.item(), rel_tol=1e-6)


def brute_force_scores(m, prefix, max_new):
    """Every sequence (ended by eot within max_new tokens, or max_new tokens long) with its total
    log p, from full forward passes without a cache."""
    eot, V = m.config.eot_token, m.config.vocab_size
    out = []
    for L in range(1, max_new + 1):
        seqs = [s for s in itertools.product(range(V), repeat=L) if eot not in s[:-1]
                and (L == max_new or s[-1] == eot)]
        x = torch.cat([prefix.expand(len(seqs), -1, -1),
                       m.llm.wte(torch.tensor([s[:-1] for s in seqs], dtype=torch.long))], 1)
        h, _ = m.llm(x)
        logp = F.log_softmax(m.llm.lm_head(h[:, -L:]), -1)
        for i, s in enumerate(seqs):
            out.append(([t for t in s if t != eot],
                        sum(logp[i, j, t].item() for j, t in enumerate(s)), L))
    return out


@torch.no_grad()
def test_beam_search_against_greedy_and_brute_force():
    # beam 1 == greedy, on an ordinary model
    m = tiny_model()
    b = tiny_batch(m.config)
    pre = m.prefix(b["mel"], b["prompt"], b["prompt_lens"])
    greedy = m.greedy(pre, 8)
    assert m.generate(b["mel"], b["prompt"], b["prompt_lens"], beam=1, max_new_tokens=8) == greedy
    for i in range(3):  # beam_search itself with beam 1 is greedy too
        h, past = m.llm(pre[i:i + 1])
        logp = F.log_softmax(m.llm.lm_head(h[:, -1]), -1)
        assert pengi.clipcap_beam_search(m.next_logp, logp, past, 1, 8, m.config.eot_token,
                                         1.0) == greedy[i]
    # a tiny model with 6 tokens (eot = 5) and peaked distributions: a beam as wide as the whole
    # search space must return the brute-force best; greedy misses it on some of these
    greedy_missed = 0
    for seed in range(6):
        m = tiny_model(seed, vocab_size=6, eot_token=5)
        for p in m.llm.parameters():
            p.data.normal_(0, 0.6)
        prefixes = m.prefix(b["mel"], b["prompt"] % 5, b["prompt_lens"])
        for i in range(3):
            pre = prefixes[i:i + 1]
            scored = brute_force_scores(m, pre, 3)
            h, past = m.llm(pre)
            logp = F.log_softmax(m.llm.lm_head(h[:, -1]), -1)
            # ranked by log p / length ** alpha, the eot counted in the length
            for alpha in (1.0, 0.0):
                best = max(scored, key=lambda t: t[1] / t[2] ** alpha)[0]
                assert pengi.clipcap_beam_search(m.next_logp, logp, past, 256, 3, 5, alpha) == best
                greedy_missed += m.greedy(pre, 3)[0] != best
    assert greedy_missed > 0


@torch.no_grad()
def test_candidate_ranking_equals_brute_force():
    m = tiny_model()
    b = tiny_batch(m.config)
    # [5, 0, 9]: a later token may have id 0 (GPT-2's "!")
    cands = [[5], [7, 8, 9], [1, 2], [30, 31, 32, 33], [5, 0, 9]]
    lp = m.rank_candidates(b["mel"], b["prompt"], b["prompt_lens"], cands)
    assert lp.shape == (3, len(cands))
    for i in range(3):
        for j, c in enumerate(cands):
            one = pengi.collate([b["mel"][i].numpy()],
                                [b["prompt"][i, :b["prompt_lens"][i]].tolist()], [c],
                                m.config.eot_token)
            _, loss = m(**one)  # mean NLL over c + eot
            assert math.isclose(lp[i, j].item(), -loss.item() * (len(c) + 1), rel_tol=1e-4,
                                abs_tol=1e-4)


@torch.no_grad()
def test_mapper_by_hand():
    """ClipCap's mapper written out: k vectors from the linear layer, then the k learned
    constants, through the blocks without a causal mask; the prefix is the output at the
    constants' positions, LayerNorm-ed and scaled."""
    m = tiny_model()
    mapper, k = m.m1, m.config.prefix_len
    torch.nn.init.normal_(mapper.prefix_const, std=1.0)
    mapper.scale.fill_(0.7)
    e = torch.randn(2, m.config.d_embed)
    x = torch.cat([mapper.linear(e).view(2, k, -1), mapper.prefix_const.expand(2, -1, -1)], 1)
    for block in mapper.h:
        h = block.ln_1(x)
        q, kk, v = block.attn.c_attn(h).split(h.size(-1), dim=2)
        heads = lambda t: t.view(2, 2 * k, block.attn.n_head, -1).transpose(1, 2)
        att = F.scaled_dot_product_attention(heads(q), heads(kk), heads(v))  # no mask
        x = x + block.attn.c_proj(att.transpose(1, 2).reshape(2, 2 * k, -1))
        x = x + block.mlp(block.ln_2(x))
    want = 0.7 * F.layer_norm(x[:, k:], (x.size(-1),), mapper.ln_out.weight, mapper.ln_out.bias)
    torch.testing.assert_close(mapper(e), want, rtol=1e-5, atol=1e-5)


def test_load_data_says_how_many_examples_each_task_has(synth_dir, dtmf_dir, capsys):
    """load_data prints the train split's examples per task of the mix, and the tasks the data
    offers none of (a corpus without music trains without those tasks)."""
    for data_dir, none in ((synth_dir, ""), (dtmf_dir, "; none for instrument, pitch, chord")):
        tok = tokenizer.load_tokenizer(data_dir, "corpus")
        data = pengi.load_data(data_dir, pengi.PengiConfig(max_frames=16), tok)
        counts = ", ".join(f"{t} {len(v)}" for t, v in sorted(data["train"]["by_task"].items()))
        assert f"pengi: {data_dir} train examples: {counts}{none}\n" in capsys.readouterr().out


def test_val_batches_are_not_randomly_cropped(synth_dir):
    """Validation batches (train.py's val loss) crop long clips from their start, whatever the
    rng: only training crops are random."""
    tok = tokenizer.load_tokenizer(synth_dir, "corpus")
    data = pengi.load_data(synth_dir, pengi.PengiConfig(max_frames=16), tok)
    d = data["val"]
    i, p, a = next(ex for ex in d["by_task"]["caption"] if d["clips"][ex[0]]["frames"] > 40)
    d["by_task"], d["task_p"] = {"caption": [(i, p, a)]}, None
    want = pengi.clip_mel(d["mel"], d["clips"][i], 16)
    for seed in range(5):
        b = pengi.get_batch(data, "val", 2, np.random.default_rng(seed))
        assert (b["mel"].numpy() == want).all()
    t = data["train"]  # train, narrowed to one long clip as well: its crops are random
    j, p, a = next(ex for ex in t["by_task"]["caption"] if t["clips"][ex[0]]["frames"] > 40)
    t["by_task"], t["task_p"] = {"caption": [(j, p, a)]}, None
    crops = {pengi.get_batch(data, "train", 1, np.random.default_rng(s))["mel"].sum().item()
             for s in range(20)}
    assert len(crops) > 1


@torch.no_grad()
def test_prefix_at_the_lms_scale(tmp_path):
    """Every prefix vector has the norm of a typical token embedding at init, whatever the LM's
    scale, the audio or the prompt (the mapper output's LayerNorm and a scale set from the LM's
    embeddings)."""
    b = tiny_batch(tiny_config())
    for std in (0.02, 0.3, 3.0):
        write_random_llm(tmp_path / "llm.pt", 50, n_embd=16, std=std)
        cfg = tiny_config(llm_init=str(tmp_path / "llm.pt"))
        pengi.set_llm_dims(cfg)
        torch.manual_seed(0)
        m = pengi.Pengi(cfg)
        pengi.init_pretrained(m)
        m.eval()
        for mel in (b["mel"], 100 * b["mel"]):
            pre = m.prefix(mel, b["prompt"], b["prompt_lens"])
            tok_rms = m.llm.wte.weight.pow(2).mean().sqrt()
            torch.testing.assert_close(pre.pow(2).mean(-1).sqrt(), tok_rms.expand(pre.shape[:2]),
                                       rtol=1e-3, atol=1e-6)
            assert 0.8 < m.prefix_norm_ratio(pre) < 1.25


def test_checkpoint_self_contained(tmp_path):
    """A checkpoint as train.py writes it (state_dict + asdict(config)) loads, generates and ranks
    the same after another LM replaces the llm_init file: the constructor reads no file, the LM's
    weights are in the state, and its config no longer names the file."""
    write_random_llm(tmp_path / "llm.pt", 50, n_embd=16, std=0.3)
    cfg = tiny_config(llm_init=str(tmp_path / "llm.pt"), llm_n_embd=8)
    pengi.set_llm_dims(cfg)
    torch.manual_seed(0)
    m = pengi.Pengi(cfg)
    pengi.init_pretrained(m)
    m.eval()
    torch.save({"model": m.state_dict(), "model_args": asdict(cfg)}, tmp_path / "ckpt.pt")
    # the checkpoint's config names no file to read again: an LM of other sizes now at that path
    # changes nothing
    assert cfg.llm_init == ""
    write_random_llm(tmp_path / "llm.pt", 50, n_embd=24, std=0.3)
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    c2 = pengi.PengiConfig(**ck["model_args"])
    pengi.set_llm_dims(c2)  # as load_data does at evaluation
    assert c2.llm_n_embd == 16
    torch.manual_seed(1)
    m2 = pengi.Pengi(c2)
    m2.load_state_dict(ck["model"])
    m2.eval()
    b = tiny_batch(c2)
    args = (b["mel"], b["prompt"], b["prompt_lens"])
    assert m2.generate(*args, beam=3,
                       max_new_tokens=5) == m.generate(*args, beam=3, max_new_tokens=5)
    torch.testing.assert_close(m2.rank_candidates(*args, [[1], [2, 3]]),
                               m.rank_candidates(*args, [[1], [2, 3]]))
    # the weights came from the checkpoint: every tensor, the frozen LM's too
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in m2.state_dict().items())


@torch.no_grad()
def test_pmi_against_brute_force():
    """PMI ranking: log p(c | clip) - log mean_{clips'} p(c | clip'), each log p from full forward
    passes."""
    m = tiny_model()
    b = tiny_batch(m.config)
    ref = tiny_batch(m.config, seed=5)
    cands = [[5], [7, 8], [30, 31, 32]]

    def brute(batch):  # (B, N) log p(c + eot | prefix), from the model's forward loss
        out = torch.zeros(batch["mel"].size(0), len(cands))
        for i in range(batch["mel"].size(0)):
            for j, c in enumerate(cands):
                one = pengi.collate([batch["mel"][i].numpy()],
                                    [batch["prompt"][i, :batch["prompt_lens"][i]].tolist()], [c],
                                    m.config.eot_token)
                out[i, j] = -m(**one)[1] * (len(c) + 1)
        return out
    lp, lp_ref = brute(b), brute(ref)
    prior = [math.log(sum(math.exp(lp_ref[r, j].item()) for r in range(3)) / 3)
             for j in range(len(cands))]
    expected = torch.tensor([[lp[i, j].item() - prior[j] for j in range(len(cands))]
                             for i in range(3)])
    got = pengi.pmi_scores(m.rank_candidates(b["mel"], b["prompt"], b["prompt_lens"], cands),
                           m.rank_candidates(ref["mel"], ref["prompt"], ref["prompt_lens"], cands))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_pmi_scores_written_out():
    """pmi_scores = log p(c | clip) - log (1/M sum_m p(c | clip_m)), written out in float64 on
    log-probs of a wide spread (the tiny model's near-uniform LM gives reference rows so alike that
    a mean of the logs passes for the log of the mean) and with M = 4 reference clips for N = 3
    candidates (so the two counts cannot stand in for each other)."""
    g = torch.Generator().manual_seed(0)
    logp = -6 * torch.rand(2, 3, generator=g, dtype=torch.float64)
    prior = -6 * torch.rand(4, 3, generator=g, dtype=torch.float64)
    want = [[logp[i, j].item() - math.log(sum(math.exp(prior[r, j].item()) for r in range(4)) / 4)
             for j in range(3)] for i in range(2)]
    torch.testing.assert_close(pengi.pmi_scores(logp, prior),
                               torch.tensor(want, dtype=torch.float64))


class WordIds:
    """A stand-in tokenizer: each word one id, below the tiny model's eot (49)."""

    def encode(self, text):
        return [sum(map(ord, w)) % 48 for w in text.split()]

    def decode(self, ids):
        return " ".join(map(str, ids))


def tiny_label_data(n_train=6, n_val=5, seed=0):
    """A data dict as load_data returns it, for the tiny config (16 mels, 32 frames): random mels,
    "class" labels of 1 and 2 words; train clip 0 has no class label."""
    rng = np.random.default_rng(seed)
    labels = ["dog", "cat bark", "bird"]

    def split(n, first_unlabelled):
        clips = [{"offset": 32 * i, "frames": 32,
                  "labels": {} if first_unlabelled and i == 0 else {"class": labels[i % 3]}}
                 for i in range(n)]
        return {"clips": clips, "mel": rng.normal(0, 1, (32 * n, 16)).astype(np.float32)}
    return {"train": split(n_train, True), "val": split(n_val, False), "max_frames": 32,
            "pad": "repeat", "candidates": {"class": sorted(labels)}}


@torch.no_grad()
def test_label_metrics_rank_pmi_and_chance_by_hand(monkeypatch):
    """label_metrics' scores, redone here one clip at a time: the raw ranking is log p(label +
    eot | clip, the task's prompt) of each candidate; the PMI ranking subtracts the log of its
    mean probability over the first prior_clips training clips that have the label key, with the
    task's prompt (not the evaluated clips, another prompt, or one clip fewer); chance is one over
    the number of candidates; majority is always answering the training split's most common label
    (here "cat bark": 1 of the 4 val clips, where the val clips' own most common, "dog", has 2).
    The scores are read where label_metrics ranks them (top_candidate_acc); the LM's weights are
    spread so that clips give different scores."""
    m = tiny_model()
    for p in m.llm.parameters():
        p.normal_(0, 0.6)
    m.init_from_lm()
    data, tok = tiny_label_data(), WordIds()
    data["train"]["clips"][2]["labels"]["class"] = "cat bark"  # train: 3 "cat bark", 1 each other
    cands = data["candidates"]["class"]
    cand_ids = [tok.encode(" " + c) for c in cands]
    ranked = []
    monkeypatch.setattr(pengi, "top_candidate_acc",
                        lambda scores, c, labels: ranked.append(scores) or 0.0)
    got = pengi.label_metrics(m, data, tok, data["val"], "class", max_clips=4, bs=3,
                              gen=dict(beam=1, max_new_tokens=2, length_penalty=1.0),
                              prior_clips=3)

    def logp(split, i):  # (N,) for one clip with the class prompt
        c = data[split]["clips"][i]
        mel = torch.from_numpy(pengi.clip_mel(data[split]["mel"], c, 32))[None]
        p = torch.tensor([tok.encode(pengi.PROMPTS["class"])])
        return m.rank_candidates(mel, p, torch.tensor([p.size(1)]), cand_ids)[0].double()
    raw = torch.stack([logp("val", i) for i in range(4)])
    ref = torch.stack([logp("train", i) for i in (1, 2, 3)])  # train clip 0 has no label
    prior = [math.log(sum(math.exp(ref[r, j].item()) for r in range(3)) / 3)
             for j in range(len(cands))]
    assert len(ranked) == 2
    torch.testing.assert_close(ranked[0].double(), raw, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ranked[1].double(), raw - torch.tensor(prior, dtype=torch.float64),
                               rtol=1e-4, atol=1e-4)
    assert got["class_chance"] == pytest.approx(1 / 3)
    assert got["class_majority"] == pytest.approx(1 / 4)


@torch.no_grad()
def test_prefix_norm_metrics_audio_then_text():
    """prefix_norm_ratio_audio is the mean norm of the audio mapper's vectors (m1 of the audio
    embedding), prefix_norm_ratio_text that of the text mapper's (m2 of the caption prompt's), each
    over the mean norm of the LM's token embeddings; the two mappers' scales are set apart here so
    that a swap shows."""
    m = tiny_model()
    rms = m.llm.wte.weight.pow(2).mean().sqrt()
    m.m1.scale.fill_(0.5 * rms)
    m.m2.scale.fill_(2.0 * rms)
    data, tok = tiny_label_data(), WordIds()
    got = pengi.prefix_norm_metrics(m, data, tok, data["val"], 3)
    d = data["val"]
    mel = torch.from_numpy(np.stack([pengi.clip_mel(d["mel"], d["clips"][i], 32)
                                     for i in range(3)]))
    p = torch.tensor([tok.encode(pengi.PROMPTS["caption"])] * 3)
    token = m.llm.wte.weight.norm(dim=-1).mean()
    audio = m.m1(m.embed_audio(mel)).norm(dim=-1).mean() / token
    text = m.m2(m.embed_text(p, torch.full((3,), p.size(1)))).norm(dim=-1).mean() / token
    assert got["prefix_norm_ratio_audio"] == pytest.approx(audio.item(), rel=1e-5)
    assert got["prefix_norm_ratio_text"] == pytest.approx(text.item(), rel=1e-5)
    assert got["prefix_norm_ratio_text"] > 2 * got["prefix_norm_ratio_audio"]


def test_sample_decodes_generate_with_its_options(capsys):
    """sample()'s text is the decoded answer of generate on the clip and prompt with sample's
    beam and max_new_tokens (checked on a model whose answer changes with each: spread LM weights,
    which never end on the eot here)."""
    m = tiny_model(2)
    with torch.no_grad():
        for p in m.llm.parameters():
            p.normal_(0, 0.6)
    m.init_from_lm()
    tok = WordIds()
    mel = torch.randn(1, 32, 16, generator=torch.Generator().manual_seed(2))
    prompt = torch.tensor([tok.encode(pengi.PROMPTS["caption"])])

    def answer(**opts):
        return tok.decode(m.generate(mel, prompt, torch.tensor([prompt.size(1)]), **opts)[0])
    want = answer(beam=3, max_new_tokens=4, length_penalty=1.0)
    assert len({want, answer(beam=1, max_new_tokens=4), answer(beam=3, max_new_tokens=30)}) == 3
    got = pengi.sample(m, tok, {"mel": mel[0]}, None, None, beam=3, max_new_tokens=4)
    assert got == {"text": want, "prompt": pengi.PROMPTS["caption"]}
    # a clip longer than max_frames: cropped to its start, and said
    assert "hears the first" not in capsys.readouterr().out
    longer = torch.cat([mel[0], torch.randn(9, 16)])
    assert pengi.sample(m, tok, {"mel": longer}, None, None, beam=3, max_new_tokens=4) == got
    assert (f"hears the first {m.config.max_frames} of the input's {len(longer)} frames"
            in capsys.readouterr().out)
    # a prompt not trained on is noted; a trained one, a question and the default are not
    for prompt, noted in (("describe it", True), (pengi.PROMPTS["class"], False),
                          (pengi.QA_PROMPT + "is it loud?", False), (None, False)):
        pengi.sample(m, tok, {"mel": mel[0]}, prompt, None, beam=1, max_new_tokens=2)
        assert ("not one of the trained prompts" in capsys.readouterr().out) == noted, prompt
    # one too long for the text tower is refused with its reason alone, not noted first
    with pytest.raises(ValueError, match="more than the text tower read in training"):
        pengi.sample(m, tok, {"mel": mel[0]}, "describe " * 100, None, beam=1)
    assert "not one of the trained" not in capsys.readouterr().out


@torch.no_grad()
def test_text_tower_with_all_the_lms_layers_is_the_lm():
    """text_init="llm" with text_n_layer = llm_n_layer: the tower is the LM itself (embeddings,
    every block and the final LayerNorm), pooled at the last prompt token; checked on an LM whose
    weights, LayerNorms included, are all random, with text_projection set to the identity."""
    m = tiny_model(text_n_layer=2)
    for p in m.llm.parameters():
        p.normal_(0, 0.5)
    m.init_from_lm()
    m.text_encoder.text_projection.weight.copy_(torch.eye(m.config.llm_n_embd))
    b = tiny_batch(m.config)
    h, _ = m.llm(m.llm.wte(b["prompt"]))
    want = h[torch.arange(3), b["prompt_lens"] - 1]
    torch.testing.assert_close(m.text_encoder(b["prompt"], b["prompt_lens"]), want)


@torch.no_grad()
def test_text_init_copies_what_it_names():
    """text_init="llm" starts the text tower from the LM's embeddings, first blocks and final
    LayerNorm; "embeddings" from its wte and wpe only; "random" from none of them. Checked on an LM
    whose weights, LayerNorms included, are all spread, so no tensor of the tower equals the LM's by
    chance."""
    for init, copied in (("llm", ("wte.", "wpe.", "h.0.", "ln_f.")),
                         ("embeddings", ("wte.", "wpe.")), ("random", ())):
        m = tiny_model(text_init=init)
        for p in m.llm.parameters():
            p.normal_(0, 0.5)
        m.init_from_lm()
        lm = m.llm.state_dict()
        for name, t in m.text_encoder.state_dict().items():
            if name.startswith("text_projection."):  # CLIP's, the tower's own
                continue
            assert torch.equal(t, lm[name]) == name.startswith(copied), (init, name)


def test_text_trainable_trains_the_tower_in_stage_pengi():
    """text_trainable=True: every tensor of the text tower trains with the rest in stage pengi (a
    few steps move each one), and the LM stays frozen."""
    m = tiny_model(text_trainable=True).train()
    assert all(p.requires_grad for p in m.text_encoder.parameters())
    assert not any(p.requires_grad for p in m.llm.parameters())
    before = {n: p.detach().clone() for n, p in m.text_encoder.named_parameters()}
    # no weight decay: a tensor moves only by its gradients
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2,
                            weight_decay=0.0)
    steps_on_one_batch(m, opt, tiny_batch(m.config), 2)
    unmoved = [n for n, p in m.text_encoder.named_parameters() if torch.equal(p, before[n])]
    assert not unmoved, unmoved


@torch.no_grad()
def test_shifted_window_block_is_the_plain_block_on_the_rolled_grid():
    """A shifted WindowBlock is the same block with unshifted windows applied to the grid rolled by
    half a window along time, then rolled back (LayerNorm, MLP and residual act per position, so
    only the windows move); and it differs from the unshifted block."""
    torch.manual_seed(0)
    shifted = pengi.WindowBlock(8, 2, (2, 4), shift=True, dropout=0.0)
    plain = pengi.WindowBlock(8, 2, (2, 4), shift=False, dropout=0.0)
    plain.load_state_dict(shifted.state_dict())
    x = torch.randn(2, 4, 8, 8)  # (B, freq rows, time columns, C)
    want = torch.roll(plain(torch.roll(x, -2, dims=2)), 2, dims=2)
    torch.testing.assert_close(shifted(x), want)
    assert not torch.allclose(shifted(x), plain(x), atol=1e-3)


@torch.no_grad()
def test_shifted_windows_carry_across_window_boundaries():
    """In a stage of two blocks (plain windows, then shifted ones), the output in one window depends
    on the input in its neighbour: the shifted block's windows straddle the boundary. A grid of 4x8
    patches in 4x4 windows: new frames under the first window change every time column of the
    stage's output, the second window's too."""
    m = tiny_model(enc_depths="2", enc_heads="2")
    enc, grids = m.audio_encoder, []
    hook = enc.ln_f.register_forward_hook(lambda mod, inp, out: grids.append(out))
    g = torch.Generator().manual_seed(0)
    mel = torch.randn(1, 32, 16, generator=g)
    other = mel.clone()
    other[:, :16] = torch.randn(1, 16, 16, generator=g)  # the frames of patch columns 0-3
    enc(mel), enc(other)
    hook.remove()
    assert grids[0].shape == (1, 4, 8, 8)
    changed = (grids[0] - grids[1]).abs().amax(dim=(0, 1, 3)) > 1e-4  # per time column
    assert changed.all(), changed


@torch.no_grad()
def test_patch_merging_reads_each_2x2_block_whole():
    """Each merged patch is made of its own 2x2 block of patches, all four of them: changing any
    one patch changes its block's merged patch and no other."""
    torch.manual_seed(0)
    merge = pengi.PatchMerging(8)
    x = torch.randn(1, 4, 6, 8)  # (B, freq rows, time columns, C)
    y = merge(x)
    assert y.shape == (1, 2, 3, 16)
    for f in range(4):
        for t in range(6):
            x2 = x.clone()
            x2[0, f, t] += 1.0
            want = torch.zeros(2, 3, dtype=torch.bool)
            want[f // 2, t // 2] = True
            assert torch.equal((merge(x2) - y)[0].abs().amax(-1) > 1e-6, want), (f, t)


def test_clap_weight_adds_the_contrastive_term_in_training_only():
    """Stage "pengi" with clap_weight w: in training the loss is the answer NLL + w * clap_loss,
    whose text side is fixed (the text projections get the very gradients of the NLL alone, the
    audio encoder others); in eval mode (train.py's val loss) it is the NLL alone."""
    m = tiny_model(clap_weight=0.5)
    b = tiny_batch(m.config)

    def loss_and_grads(weight, mode):
        m.config.clap_weight = weight
        m.train(mode)
        m.zero_grad()
        _, loss = m(**b)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in m.named_parameters()
                             if p.grad is not None}
    nll, g0 = loss_and_grads(0.0, True)
    both, gw = loss_and_grads(0.5, True)
    with torch.no_grad():
        clap = m.clap_loss(m.embed_audio(b["mel"]), b["answer"], b["targets"]).item()
    assert both == pytest.approx(nll + 0.5 * clap, rel=1e-5)
    text = [n for n in g0 if n.startswith(("text_proj.", "text_encoder."))]
    assert "text_encoder.text_projection.weight" in text and "text_proj.linear1.weight" in text
    for n in text:
        torch.testing.assert_close(gw[n], g0[n], msg=n)
    assert not torch.allclose(gw["audio_encoder.patch_embed.weight"],
                              g0["audio_encoder.patch_embed.weight"])
    assert loss_and_grads(0.5, False)[0] == pytest.approx(loss_and_grads(0.0, False)[0], rel=1e-6)


def test_audio_embedding_keeps_where_in_frequency_the_energy_is():
    """With no position embedding, the encoder is equivariant to a cyclic shift of the mel bins by
    a whole window of patches, so a mean over its last grid cannot tell the two inputs apart (the
    setup, checked). The frequency head reads the rows in place, so it can: pitch lives there."""
    m = tiny_model(n_mels=32)
    with torch.no_grad():
        m.audio_encoder.pos_emb.zero_()
    enc = m.audio_encoder
    grids = []
    hook = enc.ln_f.register_forward_hook(lambda mod, inp, out: grids.append(out))
    mel = torch.randn(2, m.config.max_frames, 32, generator=torch.Generator().manual_seed(0))
    window_of_bins = m.config.window * m.config.patch_size
    with torch.no_grad():
        a, b = enc(mel), enc(torch.roll(mel, window_of_bins, dims=2))
    hook.remove()
    torch.testing.assert_close(grids[0].mean(dim=(1, 2)), grids[1].mean(dim=(1, 2)))
    assert (a - b).norm(dim=1).min() > 0.1 * a.norm(dim=1).min()


def test_clap_stage_trains_the_encoders_only():
    """stage="clap": the contrastive loss alone moves the audio encoder and the whole text tower,
    and nothing of the mappers or the LM; a Pengi model then takes its weights (train.py's
    init_from) with the text tower frozen."""
    m = tiny_model(stage="clap").train()
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert ("text_encoder.h.0.attn.c_attn.weight" in trainable
            and "audio_encoder.patch_embed.weight" in trainable)
    assert not any(n.startswith(("m1.", "m2.", "llm.")) for n in trainable)
    b = tiny_batch(m.config, B=3)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(10):
        logits, loss = m(**b)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert logits is None and losses[-1] < losses[0]
    after = dict(m.named_parameters())
    # every tensor of both encoders moved (a detached audio path would leave its encoder as it was)
    moved = {n for n in trainable if not torch.equal(after[n], before[n])}
    assert moved == trainable, sorted(trainable - moved)[:5]
    assert all(torch.equal(after[n], before[n]) for n in before
               if n.startswith(("m1.", "m2.", "llm.")))
    p = tiny_model(seed=1)
    p.load_state_dict(m.state_dict())
    assert not any(q.requires_grad for n, q in p.named_parameters()
                   if n.startswith("text_encoder.h."))
    torch.testing.assert_close(p.eval().embed_audio(b["mel"]), m.eval().embed_audio(b["mel"]))


def train_steps(m, data, steps, lr):
    """steps of AdamW (no weight decay) on m's trainable parameters, in train mode, over training
    batches of 16 drawn with seed 0."""
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr,
                            weight_decay=0.0)
    rng = np.random.default_rng(0)
    m.train()
    for _ in range(steps):
        _, loss = m(**pengi.get_batch(data, "train", 16, rng))
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_clap_stage_learns_held_out_retrieval(synth_dir):
    """A short clap stage on the synth fixture's class labels (150 steps) aligns audio with text on
    held-out clips: matching each val clip's audio embedding to the nearest of the training
    labels' text embeddings finds its class far more often than before training (0-0.21 -> 0.57-0.93
    over 15 seeds tried) and more often than always answering the most common val class."""
    tok = tokenizer.load_tokenizer(synth_dir, "corpus")
    cfg = pengi.PengiConfig(stage="clap", tasks="class", max_frames=128, enc_dim=16,
                            enc_depths="1,1", enc_heads="2,2", window=8, d_embed=32,
                            text_n_layer=1, llm_n_layer=1, llm_n_head=2, llm_n_embd=32,
                            llm_block_size=64, dropout=0.0)
    data = pengi.load_data(synth_dir, cfg, tok)
    torch.manual_seed(0)
    m = pengi.Pengi(cfg)
    d, labels = data["val"], data["candidates"]["class"]
    idx = [i for i, c in enumerate(d["clips"]) if "class" in c["labels"]]
    truth = [d["clips"][i]["labels"]["class"] for i in idx]
    majority = Counter(truth).most_common(1)[0][1] / len(truth)
    assert len(idx) >= 10 and len(labels) >= 8 and majority < 0.5

    @torch.no_grad()
    def retrieval_acc():
        m.eval()
        mel = torch.from_numpy(np.stack([pengi.clip_mel(d["mel"], d["clips"][i], 128)
                                         for i in idx]))
        audio = m.embed_audio(mel)
        text = torch.cat([m.embed_text(torch.tensor([tok.encode(" " + c)]),
                                       torch.tensor([len(tok.encode(" " + c))]))
                          for c in labels])
        guess = (audio @ text.t()).argmax(1).tolist()
        return sum(labels[g] == t for g, t in zip(guess, truth)) / len(truth)
    before = retrieval_acc()
    train_steps(m, data, 150, lr=1e-3)
    after = retrieval_acc()
    assert after >= before + 0.3 and after > majority, (before, after, majority)


def soft_target_ce(rows, pos):
    """Mean over rows i of -(mean over the positives pos[i] of log softmax(row i)_j), in Python
    floats: one direction of clap_loss written out."""
    return sum(-sum(r[j] - math.log(sum(math.exp(v) for v in r)) for j in pos[i]) / len(pos[i])
               for i, r in enumerate(rows)) / len(rows)


def test_clap_loss_against_written_out_infonce():
    """clap_loss = -1/2 (mean_i sum_j P_ij log softmax_j(S_ij)
                         + mean_j sum_i P_ij log softmax_i(S_ij))
    with S_ij = <a_i, t_j> / clap_temp over unit audio and answer-text embeddings, and P_ij uniform
    over the clips whose answer equals clip i's (a duplicated answer has two positives). Written
    out here in float64 loops, text embedded one answer at a time without padding. (In eval mode,
    as here, duplicated answers have identical text embeddings and these P give the value of plain
    CLIP's diagonal targets; in training the projections' dropout makes them differ, and the
    shared positives change the loss: 3.852 vs 3.870 on a data/synth batch.)"""
    temp = 0.2  # not the default, so a hard-wired 0.07 would show
    answers = [[5, 6, 7], [8, 9], [5, 6, 7], [10], [5, 6, 7, 11]]  # clips 0 and 2 share theirs
    B, cfg = len(answers), tiny_config(stage="clap", clap_temp=temp)
    g = torch.Generator().manual_seed(3)
    mel = torch.randn(B, cfg.max_frames, cfg.n_mels, generator=g)
    b = pengi.collate(list(mel.numpy()), [[1, 2]] * B, answers, cfg.eot_token)
    m = tiny_model(stage="clap", clap_temp=temp)
    with torch.no_grad():
        _, loss = m(**b)
        a = F.normalize(m.embed_audio(b["mel"]), dim=-1).double().tolist()
        t = [F.normalize(m.embed_text(torch.tensor([x]), torch.tensor([len(x)])), dim=-1)[0]
             .double().tolist() for x in answers]
    S = [[sum(p * q for p, q in zip(a[i], t[j])) / temp for j in range(B)] for i in range(B)]
    pos = [[j for j in range(B) if answers[j] == answers[i]] for i in range(B)]
    assert pos[0] == [0, 2] and pos[1] == [1]
    cols = [list(col) for col in zip(*S)]
    ref = 0.5 * (soft_target_ce(S, pos) + soft_target_ce(cols, pos))
    assert loss.item() == pytest.approx(ref, abs=1e-5)
    # the two directions differ on this batch, so each term matters
    assert abs(soft_target_ce(S, pos) - soft_target_ce(cols, pos)) > 1e-3
    # the same loss when called directly, as the pengi stage's clap_weight does
    with torch.no_grad():
        direct = m.clap_loss(m.embed_audio(b["mel"]), b["answer"], b["targets"])
    assert direct.item() == pytest.approx(ref, abs=1e-5)


def test_bad_inputs_named():
    m = tiny_model()
    b = tiny_batch(m.config)
    with pytest.raises(ValueError, match="candidate list is empty"):
        m.rank_candidates(b["mel"], b["prompt"], b["prompt_lens"], [])
    room = m.config.llm_block_size - 2 * m.config.prefix_len
    m.rank_candidates(b["mel"], b["prompt"], b["prompt_lens"], [[1] * room])  # fits exactly
    with pytest.raises(ValueError, match=f"a candidate of {room + 1} tokens; .* room for {room}"):
        m.rank_candidates(b["mel"], b["prompt"], b["prompt_lens"], [[1] * (room + 1)])
    long = torch.zeros(1, m.config.llm_block_size + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="text tower's context"):
        m.embed_text(long, torch.tensor([long.size(1)]))
    # a mel not fitted to the encoder's grid (a frame short; a mel bin too many), and a clap-stage
    # forward without the targets that mark where each answer ends
    T, n_mels = m.config.max_frames, m.config.n_mels
    for shape in ((1, T - 1, n_mels), (1, T, n_mels + 1)):
        with pytest.raises(ValueError, match=rf"a mel of \({shape[1]}, {shape[2]}\) .* takes "
                                             rf"\({T}, {n_mels}\) \(max_frames, n_mels\)"):
            m.embed_audio(torch.zeros(shape))
    clap = tiny_model(stage="clap")
    with pytest.raises(ValueError, match="stage 'clap' needs targets"):
        clap(b["mel"], b["prompt"], b["prompt_lens"], b["answer"])
    assert clap(**b)[1].isfinite()  # and with them it runs
    # windows that do not tile a stage's grid: the stage and its own grid are named (64 mel bins
    # and 96 frames in patches of 4: 16x24, then 8x12 in stage 1, which 8x8 windows do not tile)
    with pytest.raises(ValueError, match=r"stage 1: its patch grid 8x12 .* into 8x8 windows"):
        pengi.stage_windows(pengi.PengiConfig(n_mels=64, max_frames=96, patch_size=4, window=8,
                                              enc_depths="2,2,2", enc_heads="2,2,2"))
    # options out of range, and sampling a clap-stage checkpoint, which writes no text
    audio = {"mel": torch.randn(20, m.config.n_mels)}
    for model, opts, said in ((m, {"beam": 0}, "beam=0: must be at least 1"),
                              (m, {"max_new_tokens": 0}, "max_new_tokens=0: must be at least 1"),
                              (tiny_model(stage="clap"), {}, "writes no text")):
        with pytest.raises(ValueError, match=said):
            pengi.sample(model, None, audio, "prompt", None, **opts)


def test_head_counts_and_stage_lists_named():
    """Settings that attention or the encoder's stages cannot use are ValueErrors that name them, at
    construction: heads that do not divide the width (the LM's and mappers' llm_n_embd; each encoder
    stage's enc_dim * 2^stage) and stage lists that are not integers."""
    for kw, said in (({"map_n_head": 3}, "map_n_head=3: must divide llm_n_embd=16"),
                     ({"llm_n_head": 3}, "llm_n_head=3: must divide llm_n_embd=16"),
                     ({"enc_heads": "3,2"}, "enc_heads='3,2': stage 0 is 8 wide"),
                     ({"enc_heads": "2,3"}, "enc_heads='2,3': stage 1 is 16 wide"),
                     ({"enc_depths": "1,x"}, "enc_depths='1,x': must be a comma list of integers"),
                     ({"enc_heads": "2,0"}, "enc_heads='2,0': every entry must be at least 1"),
                     ({"prefix_len": 0}, "prefix_len=0: must be at least 1"),
                     ({"max_prompt_tokens": 0}, "max_prompt_tokens=0: must be at least 1"),
                     ({"max_answer_tokens": -2}, "max_answer_tokens=-2: must be at least 1"),
                     ({"window": 0}, "window=0: must be at least 1"),
                     ({"patch_size": 0}, "patch_size=0: must be at least 1"),
                     ({"max_frames": 0}, "max_frames=0: must be at least 1"),
                     ({"enc_dim": 0}, "enc_dim=0: must be at least 1"),
                     ({"d_embed": 0}, "d_embed=0: must be at least 1"),
                     ({"text_n_layer": -1}, "text_n_layer=-1: must be at least 0"),
                     # no mapper layer: the prefix would be the same constants for every clip
                     ({"map_n_layer": 0}, "map_n_layer=0: must be at least 1"),
                     ({"clap_temp": 0.0}, "clap_temp=0.0: must be above 0"),      # a NaN loss
                     ({"clap_weight": -1.0}, "clap_weight=-1.0: must be at least 0")):
        with pytest.raises(ValueError, match=said):
            pengi.Pengi(tiny_config(**kw))
    pengi.Pengi(tiny_config(enc_heads="4,8", map_n_head=4))  # divisors of 8, 16 and 16


def test_sequences_fit_the_lms_block(synth_dir):
    """[audio k][text k][answer]: load_data refuses settings whose longest answer would not fit the
    LM's block (training would fail at whichever step drew such an answer), and decoding stops
    where the block ends, however many tokens are asked for."""
    tok = tokenizer.load_tokenizer(synth_dir, "corpus")
    fit = dict(max_frames=64, prefix_len=8, llm_block_size=48)
    with pytest.raises(ValueError, match=r"2 \* prefix_len \(8\) \+ max_answer_tokens \(40\) "
                                         r"exceeds the LM's llm_block_size 48"):
        pengi.load_data(synth_dir, pengi.PengiConfig(max_answer_tokens=40, **fit), tok)
    pengi.load_data(synth_dir, pengi.PengiConfig(max_answer_tokens=32, **fit), tok)  # 16 + 32
    # the clap stage has no prefix, but its text tower reads the answers in the same context
    with pytest.raises(ValueError, match="max_answer_tokens=50 exceeds the text tower's context, "
                                         "the LM's llm_block_size 48"):
        pengi.load_data(synth_dir, pengi.PengiConfig(stage="clap", max_answer_tokens=50, **fit),
                        tok)
    m = tiny_model(llm_block_size=16)  # a prefix of 2 * 3, room for 10 tokens
    with torch.no_grad():
        m.llm.wte.weight[m.config.eot_token] = 0  # eot's logit 0: never the best, decoding runs on
    b = tiny_batch(m.config)
    for beam in (1, 3):
        out = m.generate(b["mel"], b["prompt"], b["prompt_lens"], beam=beam, max_new_tokens=100)
        assert [len(o) for o in out] == [10, 10, 10], beam

    class Tokens:  # the prompt and answers as token ids
        def encode(self, text):
            return [int(t) for t in text.split()]

        def decode(self, ids):
            return " ".join(map(str, ids))
    for beam in (1, 3):
        text = pengi.sample(m, Tokens(), {"mel": b["mel"][0]}, "1 2 3", None, beam=beam,
                            max_new_tokens=100)["text"]
        assert len(text.split()) == 10


def test_llm_loaders(tmp_path):
    """HF GPT-2 (safetensors with the transformer. prefix, pytorch_model.bin without) and our
    stage-llm ckpt.pt."""
    from safetensors.torch import save_file
    torch.manual_seed(1)
    src = pengi.GPT2(50, 2, 2, 16, 64)
    for p in src.parameters():
        p.data.normal_(0, 0.5)
    sd = {k: v.clone() for k, v in src.state_dict().items() if k != "lm_head.weight"}
    hf = {}
    for k, v in sd.items():
        if k.endswith(("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                       "mlp.c_proj.weight")):
            v = v.t().contiguous()  # HF Conv1D layout
        hf[k] = v
    for i in range(2):
        hf[f"h.{i}.attn.bias"] = torch.ones(1, 1, 64, 64)
    hf_config = {"n_layer": 2, "n_head": 2, "n_embd": 16, "n_positions": 64, "vocab_size": 50}
    (tmp_path / "st").mkdir()
    (tmp_path / "bin").mkdir()
    save_file({"transformer." + k: v for k, v in hf.items()},
              str(tmp_path / "st" / "model.safetensors"))
    torch.save(hf, tmp_path / "bin" / "pytorch_model.bin")
    for d in ("st", "bin"):
        (tmp_path / d / "config.json").write_text(json.dumps(hf_config))
    ckpt = {"model": {"llm." + k: v for k, v in sd.items()} | {"q_former.x": torch.zeros(1)},
            "model_args": {"llm_n_layer": 2, "llm_n_head": 2, "llm_n_embd": 16,
                           "llm_block_size": 64, "vocab_size": 50, "stage": "llm"}}
    torch.save(ckpt, tmp_path / "ckpt.pt")
    x = torch.randn(2, 5, 16)
    ref, _ = src(x)
    for path in (tmp_path / "st", tmp_path / "bin" / "pytorch_model.bin", tmp_path / "ckpt.pt"):
        torch.manual_seed(0)
        cfg = tiny_config(llm_init=str(path), llm_n_embd=8, llm_n_layer=1, vocab_size=0)
        pengi.set_llm_dims(cfg)  # load_data's step: the sizes come from the file
        m = pengi.Pengi(cfg)
        pengi.init_pretrained(m)
        assert (m.config.llm_n_embd, m.config.llm_n_layer, m.config.vocab_size) == (16, 2, 50)
        torch.testing.assert_close(m.llm(x)[0], ref)
        assert torch.equal(m.llm.lm_head.weight, sd["wte.weight"])
        # text_init="llm": the text tower starts as the LM's embeddings and first layer
        assert torch.equal(m.text_encoder.wte.weight, sd["wte.weight"])
        assert torch.equal(m.text_encoder.h[0].attn.c_attn.weight, sd["h.0.attn.c_attn.weight"])
    # a config.json that is not JSON, or lacks n_head, is named with llm_init (salmonn.py's copy
    # of this loader is kept identical: tests/test_copies.py)
    for text, said in (("{n_head: 2}", "is not JSON"), (json.dumps({"n_layer": 2}),
                                                          "has no n_head")):
        (tmp_path / "st" / "config.json").write_text(text)
        with pytest.raises(ValueError, match=f"llm_init={tmp_path / 'st'}: "
                                             f"{tmp_path / 'st' / 'config.json'} {said}"):
            pengi.set_llm_dims(tiny_config(llm_init=str(tmp_path / "st")))
    # an LM whose vocab is not the tokenizer's (here 50 against 49, or 51) is refused, naming both
    for vocab in (49, 51):
        with pytest.raises(ValueError, match=f"vocab_size 50 != the {vocab} of tokenizer"):
            pengi.set_llm_dims(tiny_config(llm_init=str(tmp_path / "ckpt.pt"), vocab_size=vocab))
    # the constructor reads no file
    m = pengi.Pengi(tiny_config(llm_init=str(tmp_path / "missing.pt")))
    with pytest.raises(FileNotFoundError, match="llm_init"):
        pengi.init_pretrained(m)
    # load_data's step names a missing file (the config's own sizes are not the LM's, and a check
    # of them, e.g. text_n_layer > llm_n_layer, would be the error instead)
    with pytest.raises(FileNotFoundError, match=f"llm_init={tmp_path / 'missing.pt'}: no such"):
        pengi.set_llm_dims(tiny_config(llm_init=str(tmp_path / "missing.pt")))
    # ... and says where else an LM is: a Pengi checkpoint holds one, which llm_init takes
    with pytest.raises(FileNotFoundError, match="a Pengi or SALMONN checkpoint holds one too"):
        pengi.set_llm_dims(tiny_config(llm_init=str(tmp_path / "missing.pt")))
    cfg = tiny_config(llm_init=str(tmp_path / "ckpt.pt"), vocab_size=0)
    pengi.set_llm_dims(cfg)
    m = pengi.Pengi(cfg)
    pengi.init_pretrained(m)  # the LM of ckpt.pt, saved in a Pengi checkpoint
    torch.save({"model": m.state_dict(), "model_name": "pengi", "model_args": asdict(m.config)},
               tmp_path / "pengi.pt")
    cfg3 = tiny_config(llm_init=str(tmp_path / "pengi.pt"), llm_n_embd=8, llm_n_layer=1)
    pengi.set_llm_dims(cfg3)
    assert (cfg3.llm_n_embd, cfg3.llm_n_layer) == (16, 2)
    m3 = pengi.Pengi(cfg3)
    pengi.init_pretrained(m3)
    torch.testing.assert_close(m3.llm(x)[0], ref)


def test_normalize_text_keeps_contractions_and_sharps():
    """Lower case, other punctuation to spaces, single spaces; ' and # stay inside words."""
    assert pengi.normalize_text("  Don't STOP,  play C#-minor! ") == "don't stop play c# minor"


def test_answer_ids_are_the_stripped_answer_after_one_space():
    """An answer is tokenized as running text: one leading space, the answer stripped, no eot."""
    class Bytes:
        encode = staticmethod(lambda text: list(text.encode()))
    assert pengi.answer_ids(Bytes, "  dog barks \n") == list(b" dog barks")


def test_bleu4_hand_worked():
    # identical: 1
    assert pengi.bleu4(["the cat sat on the mat"],
                       [["The cat sat on the mat."]]) == pytest.approx(1.0)
    # one substitution in 6 words: p1 5/6, p2 3/5, p3 2/4, p4 1/3, no brevity penalty: (1/12)^(1/4)
    assert pengi.bleu4(["a b c d x f"], [["a b c d e f"]]) == pytest.approx((1 / 12) ** 0.25)
    # a perfect prefix of 4 words against 6: all precisions 1, brevity penalty exp(1 - 6/4)
    assert pengi.bleu4(["a b c d"], [["a b c d e f"]]) == pytest.approx(math.exp(-0.5))
    # clipping: "the" counts at most twice; no matching bigram -> 0
    assert pengi.bleu4(["the the the the"], [["the cat the mat"]]) == 0.0
    # corpus level: n-gram counts are pooled over hypotheses before the ratio; closest reference
    # length hyp1 = ref1 (5 words), hyp2 "a b c d x" vs "a b c d e" -> p1 9/10, p2 7/8, p3 5/6,
    # p4 3/4
    got = pengi.bleu4(["p q r s t", "a b c d x"], [["p q r s t"], ["a b c d e", "z"]])
    assert got == pytest.approx((9 / 10 * 7 / 8 * 5 / 6 * 3 / 4) ** 0.25)
    # the brevity penalty takes the closest reference length, not the shortest: 6 words (2 away)
    # over 1 word (3 away), so exp(1 - 6/4); on a tie the shorter one (3 and 5 words for 4): no
    # penalty, where 5 would give exp(1 - 5/4)
    assert pengi.bleu4(["a b c d"], [["a b c d e f", "a"]]) == pytest.approx(math.exp(-0.5))
    assert pengi.bleu4(["a b c d"], [["a b c", "a b c d e"]]) == pytest.approx(1.0)


def test_qa_acc_by_kind_partitions_exact_match():
    """Per-kind QA accuracies are exact match on each kind's questions; weighted by their counts
    they give back the overall qa_acc."""
    clips = [{"kind": "speech"}, {"kind": "music"}, {"kind": "speech"}]
    ex = [(0, "q", "A man."), (1, "q", "two"), (2, "q", "red"), (1, "q", "up"), (0, "q", "one")]
    hyps = ["a man", "two", "blue", "down", "One"]
    got = pengi.qa_acc_by_kind(hyps, ex, clips)
    assert got == {"qa_acc_music": 0.5, "qa_acc_speech": pytest.approx(2 / 3)}
    assert 3 * got["qa_acc_speech"] + 2 * got["qa_acc_music"] == pytest.approx(
        5 * pengi.exact_match(hyps, ex))


@torch.no_grad()
def test_caption_bleu4_and_qa_acc_through_evaluate(synth_dir, monkeypatch):
    """evaluate's caption_bleu4, qa_acc and qa_acc_{kind}, with the model's generate replaced by an
    oracle that finds the clip by its mel and the question in the prompt's text: answering every
    example with its reference scores 1.0 on each; a constant answer gets pengi.bleu4 of the
    constant against the captions (not of the captions against the constant) and the share of
    questions whose normalised answer it is, overall and per kind. The prompts that reach
    generation are the caption template and QA_PROMPT + the question, one per caption and per
    question of the split, with evaluate's decoding options."""
    tok = tokenizer.load_tokenizer(synth_dir, "corpus")
    cfg = pengi.PengiConfig(tasks="caption,qa", max_frames=64, enc_dim=8, enc_depths="1,1",
                            enc_heads="2,2", window=4, d_embed=16, text_n_layer=1, prefix_len=3,
                            map_n_layer=1, map_n_head=2, llm_n_layer=1, llm_n_head=2,
                            llm_n_embd=16, llm_block_size=64, dropout=0.0)
    data = pengi.load_data(synth_dir, cfg, tok)
    torch.manual_seed(0)
    m = pengi.Pengi(cfg)
    d = data["val"]
    mels = [torch.from_numpy(pengi.clip_mel(d["mel"], c, 64)) for c in d["clips"]]
    assert all(not torch.equal(mels[i], mels[j])  # the oracle can tell the clips apart
               for i in range(len(mels)) for j in range(i))
    captions = [(i, c["caption"]) for i, c in enumerate(d["clips"]) if c.get("caption")]
    questions = [(i, qa["q"], qa["a"]) for i, c in enumerate(d["clips"]) for qa in c.get("qa", [])]
    assert len(captions) >= 4 and len(questions) >= 10
    seen, gens = [], []

    def oracle(answer_of):
        def generate(mel, prompt, prompt_lens, **gen):
            gens.append(gen)
            out = []
            for b in range(mel.size(0)):
                i = next(i for i, x in enumerate(mels) if torch.equal(mel[b].cpu(), x))
                text = tok.decode(prompt[b, :prompt_lens[b]].tolist())
                seen.append((i, text))
                out.append(tok.encode(" " + answer_of(i, text)))
            return out
        return generate

    def reference(i, text):
        if text == pengi.PROMPTS["caption"]:
            return d["clips"][i]["caption"]
        assert text.startswith(pengi.QA_PROMPT), text
        return next(qa["a"] for qa in d["clips"][i]["qa"]
                    if pengi.QA_PROMPT + qa["q"] == text)

    monkeypatch.setattr(m, "generate", oracle(reference))
    got = pengi.evaluate(m, data, tok, "val", beam=2, max_new_tokens=7, length_penalty=0.5,
                         batch_size=5, probe=False)
    kinds = sorted({d["clips"][i]["kind"] for i, _, _ in questions})
    assert got["caption_bleu4"] == pytest.approx(1.0) and got["qa_acc"] == 1.0
    assert {k: v for k, v in got.items() if k.startswith("qa_acc_")} == {
        f"qa_acc_{k}": 1.0 for k in kinds}
    assert seen == ([(i, pengi.PROMPTS["caption"]) for i, _ in captions]
                    + [(i, pengi.QA_PROMPT + q) for i, q, _ in questions])
    assert gens and all(g == dict(beam=2, max_new_tokens=7, length_penalty=0.5) for g in gens)

    # a constant answer per task: the longest caption (longer than the others, so that the brevity
    # penalty falls on one order of bleu4's arguments only); the most common answer to the questions
    norm = pengi.normalize_text
    const_caption = max((c for _, c in captions), key=lambda c: len(c.split()))
    const_answer = Counter(norm(a) for _, _, a in questions).most_common(1)[0][0]
    seen.clear()
    monkeypatch.setattr(m, "generate", oracle(
        lambda i, text: const_caption if text == pengi.PROMPTS["caption"]
        else const_answer.title() + "."))  # right after normalize_text only
    got = pengi.evaluate(m, data, tok, "val", beam=1, batch_size=5, probe=False)
    refs = [[c] for _, c in captions]
    bleu = pengi.bleu4([const_caption] * len(refs), refs)
    swapped = pengi.bleu4([c for _, c in captions], [[const_caption]] * len(refs))
    assert 0 < bleu < 1 and abs(bleu - swapped) > 0.1 * bleu  # the two orders differ here
    assert got["caption_bleu4"] == pytest.approx(bleu)
    right = [norm(a) == const_answer for _, _, a in questions]
    assert 0 < sum(right) < len(right)
    assert got["qa_acc"] == pytest.approx(sum(right) / len(right))
    for kind in kinds:
        mine = [r for (i, _, _), r in zip(questions, right) if d["clips"][i]["kind"] == kind]
        assert got[f"qa_acc_{kind}"] == pytest.approx(sum(mine) / len(mine)), kind
    assert len(seen) == len(captions) + len(questions)


@torch.no_grad()
def test_evaluate_runs_in_eval_mode_and_restores_training():
    """evaluate decodes and ranks with the model in eval mode (no dropout: the same metrics twice),
    then leaves it in the training mode it found."""
    m = tiny_model(dropout=0.5).train()
    data, tok = tiny_label_data(), WordIds()
    data["tasks"] = ["class"]
    modes = []
    for name in ("generate", "rank_candidates", "prefix"):
        real = getattr(m, name)

        def spy(*a, _real=real, **kw):
            modes.append(m.training or m.audio_encoder.training or m.m1.training)
            return _real(*a, **kw)
        setattr(m, name, spy)
    opts = dict(max_clips=3, beam=1, max_new_tokens=2, batch_size=2, prior_clips=2, probe=False)
    got = pengi.evaluate(m, data, tok, "val", **opts)
    assert modes and not any(modes)
    assert m.training and m.audio_encoder.training
    assert pengi.evaluate(m, data, tok, "val", **opts) == got


@torch.no_grad()
def test_clap_stage_evaluate_is_the_probe_or_nothing():
    """A clap-stage model writes no text: evaluate gives the linear probe's accuracy, or nothing
    with probe=False."""
    m = tiny_model(stage="clap")
    data, tok = tiny_label_data(), WordIds()
    data["tasks"] = ["class"]
    assert pengi.evaluate(m, data, tok, "val", probe=False) == {}
    got = pengi.evaluate(m, data, tok, "val")
    assert set(got) == {"probe_acc"} and 0 <= got["probe_acc"] <= 1
    # the probe scored on the split asked for, not on the clips it was fitted on
    on = {s: pengi.in_eval_mode(m, pengi.linear_probe, m, data, s, "class")
          for s in ("val", "train")}
    assert got["probe_acc"] == on["val"] != on["train"]


@torch.no_grad()
def test_evaluate_scores_every_task_of_the_default_mix_but_metadata():
    """A model trained on the default mix (metadata included) is evaluated on every task but
    metadata, which has no score: tasks="" gives the others, and evaluate runs on such data."""
    assert pengi.eval_tasks({"tasks": list(pengi.TASKS)}, "") == [
        "caption", "class", "qa", "instrument", "pitch", "chord"]
    assert pengi.eval_tasks({"tasks": ["metadata", "class"]}, "") == ["class"]
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['metadata'\].*\(metadata is trained "
                                         r"but not scored\)"):
        pengi.eval_tasks({"tasks": list(pengi.TASKS)}, "metadata")
    with pytest.raises(ValueError, match="music is scored as instrument, pitch and chord"):
        pengi.eval_tasks({"tasks": list(pengi.TASKS)}, "music")
    data = tiny_label_data()
    data["tasks"] = list(pengi.TASKS)
    m, opts = tiny_model(), dict(beam=1, max_new_tokens=2, prior_clips=2, probe=False)
    got = pengi.evaluate(m, data, WordIds(), "val", max_clips=2, **opts)
    assert "class_acc_gen" in got and "prefix_norm_ratio_audio" in got
    # max_clips=0 scores every example, as SALMONN's evaluate reads it
    every = pengi.evaluate(m, data, WordIds(), "val", max_clips=0, **opts)
    assert every == pengi.evaluate(m, data, WordIds(), "val", max_clips=10 ** 6, **opts) != got
    with pytest.raises(ValueError, match=r"max_clips=-1: must be at least 0"):
        pengi.evaluate(m, data, WordIds(), "val", max_clips=-1, **opts)


@torch.no_grad()
def test_evaluate_refuses_a_probe_key_typo_before_generating(monkeypatch):
    """probe_keys naming a label key no clip has is refused before any answer is generated (it
    was refused after the whole evaluation, at the probe that comes last); with probe=False it is
    not read."""
    m, data, tok = tiny_model(), tiny_label_data(), WordIds()
    data["tasks"] = ["class"]
    generated = []
    answers = pengi.generate_answers

    def spy(*a, **kw):
        generated.append(1)
        return answers(*a, **kw)
    monkeypatch.setattr(pengi, "generate_answers", spy)
    opts = dict(max_clips=2, beam=1, max_new_tokens=2, prior_clips=2)
    with pytest.raises(ValueError, match=r"probe_keys: no clip has the label key\(s\) \['clas'\]"):
        pengi.evaluate(m, data, tok, "val", probe_keys="clas", **opts)
    assert not generated
    assert "class_acc_gen" in pengi.evaluate(m, data, tok, "val", probe_keys="clas",
                                             probe=False, **opts)


def test_text_metrics_score_the_first_max_clips_examples(monkeypatch):
    """caption_bleu4 and qa_acc are scored on the first max_clips captions and the first max_clips
    questions of the split, in the split's order (clip 1 has no caption)."""
    clips = [{"kind": "speech", "qa": [{"q": f"q{i}a", "a": "yes"}, {"q": f"q{i}b", "a": "no"}]}
             for i in range(4)]
    for i in (0, 2, 3):
        clips[i]["caption"] = f"a sound number {i}"
    seen = []

    def answers(model, data, tok, d, ex, bs, gen):
        seen.append(ex)
        return [a for _, _, a in ex]
    monkeypatch.setattr(pengi, "generate_answers", answers)
    got = pengi.text_metrics(None, {}, None, {"clips": clips}, ["caption", "qa"], 2, 8, {})
    assert seen == [[(0, pengi.PROMPTS["caption"], "a sound number 0"),
                     (2, pengi.PROMPTS["caption"], "a sound number 2")],
                    [(0, pengi.QA_PROMPT + "q0a", "yes"), (0, pengi.QA_PROMPT + "q0b", "no")]]
    assert got["caption_bleu4"] == pytest.approx(1.0) and got["qa_acc"] == 1.0


def test_fit_frames_pads_and_crops(synth_dir):
    """Longer clips are cropped to max_frames; shorter ones are repeated (CLAP's way) or followed
    by silent frames, which keep the clip once, from the start. An unknown pad is named."""
    x = np.arange(15, dtype=np.float32).reshape(5, 3)
    rep = pengi.fit_frames(x, 12)
    assert rep.shape == (12, 3) and (rep[:5] == x).all() and (rep[5:10] == x).all()
    assert (rep[10:] == x[:2]).all()
    sil = pengi.fit_frames(x, 12, pad="silence")
    assert sil.shape == (12, 3) and (sil[:5] == x).all() and (sil[5:] == pengi.MEL_SILENCE).all()
    assert (pengi.fit_frames(x, 3, pad="silence") == x[:3]).all()
    crop = pengi.fit_frames(x, 3, np.random.default_rng(0))
    assert any((crop == x[s:s + 3]).all() for s in range(3))
    tok = tokenizer.load_tokenizer(synth_dir, "corpus")
    with pytest.raises(ValueError, match="pad: 'zeros' is not one of repeat, silence"):
        pengi.load_data(synth_dir, pengi.PengiConfig(pad="zeros"), tok)


@torch.no_grad()
def test_silence_padding_in_every_path(monkeypatch):
    """pad="silence": a clip shorter than max_frames is followed by silent frames, not repeated,
    wherever it is read: training and validation batches (get_batch), evaluation's (eval_batches),
    the probe's embeddings (clip_embeddings) and sample()."""
    data = tiny_label_data()
    data["pad"], data["eot_token"] = "silence", 49
    for split in ("train", "val"):
        for c in data[split]["clips"]:
            c["frames"] = 20  # of max_frames 32
        data[split]["by_task"], data[split]["task_p"] = {"class": [(1, [1, 2], [3])]}, None

    def padded(mel, d):  # mel (B, 32, 16) of clip 1 of the split d
        clip = torch.from_numpy(d["mel"][32:52])
        assert torch.equal(mel[:, :20], clip.expand(mel.size(0), -1, -1))
        return bool((mel[:, 20:] == pengi.MEL_SILENCE).all())
    for split in ("train", "val"):
        b = pengi.get_batch(data, split, 2, np.random.default_rng(0))
        assert padded(b["mel"], data[split]), split
    m = tiny_model(pad="silence")
    mel, _, _ = next(pengi.eval_batches(m, data, WordIds(), data["val"],
                                           [(1, pengi.PROMPTS["class"], "")], 1))
    assert padded(mel, data["val"])
    embedder, seen = MeanEmbedding(), []
    embedder.embed_audio = lambda mel: seen.append(mel) or mel.mean(1)
    pengi.clip_embeddings(embedder, data["val"], [1], 32, "silence")
    assert padded(seen[0], data["val"])
    monkeypatch.setattr(m, "generate", lambda mel, *a, **kw: seen.append(mel) or [[1]])
    pengi.sample(m, WordIds(), {"mel": torch.from_numpy(data["val"]["mel"][32:52])}, "a b", None,
                 beam=1, max_new_tokens=1)
    assert padded(seen[1], data["val"])


class MeanEmbedding(torch.nn.Module):
    """A stand-in audio embedding for the probe tests: the clip's mean mel frame."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))  # the probe code reads its device from one

    def embed_audio(self, mel):
        return mel.mean(1)


def test_probe_metrics_per_label_key():
    """The linear probe reads any label key: a key the embedding separates scores 1.0, the class
    key keeps its name probe_acc, probe_majority_{key} is the constant answer's accuracy, and a key
    no clip has (a typo) is named in an error, not left out of the results."""
    rng = np.random.default_rng(0)

    def split(n):
        clips, mel = [], []
        for i in range(n):
            gender, cls = ("male", "female")[i % 3 == 0], ("a", "b", "c")[i % 3]
            x = rng.normal(0, 0.1, (4, 6)).astype(np.float32)
            x[:, 0] += 1.0 if gender == "female" else -1.0
            x[:, 1] += ("a", "b", "c").index(cls)
            clips.append({"offset": 4 * i, "frames": 4,
                          "labels": {"class": cls, "gender": gender}})
            mel.append(x)
        return {"clips": clips, "mel": np.concatenate(mel)}

    data = {"train": split(60), "val": split(30), "max_frames": 4, "pad": "repeat"}
    with pytest.raises(ValueError, match=r"probe_keys: no clip has the label key\(s\) \['count'\]; "
                                         r"the clips' keys: class, gender, or qa"):
        pengi.probe_metrics(MeanEmbedding(), data, "val", "class, gender, count", 2000)
    got = pengi.probe_metrics(MeanEmbedding(), data, "val", "class, gender", 2000)
    assert set(got) == {"probe_acc", "probe_acc_gender", "probe_majority_gender"}
    assert got["probe_acc"] == 1.0 and got["probe_acc_gender"] == 1.0
    assert got["probe_majority_gender"] == pytest.approx(20 / 30)


def test_random_crop_starts_anywhere():
    """A training crop (fit_frames with an rng) of a clip 2 frames longer than max_frames starts
    at frame 0, 1 or 2, each of them drawn over 50 seeds: the model sees every part of long
    clips."""
    x = np.arange(5, dtype=np.float32)[:, None].repeat(3, 1)  # frame i holds the value i
    starts = set()
    for seed in range(50):
        crop = pengi.fit_frames(x, 3, np.random.default_rng(seed))
        s = int(crop[0, 0])
        assert (crop == x[s:s + 3]).all()
        starts.add(s)
    assert starts == {0, 1, 2}
    assert (pengi.fit_frames(x, 3) == x[:3]).all()  # without an rng (evaluation): from the start


def test_probe_majority_from_the_training_split_and_unseen_labels_wrong():
    """probe_majority_{key} always answers the training split's most common label: train is 3/4
    "female", which 2 of the 12 val clips are (not the 8 of 12 "male" the val split's own majority
    would claim, peeking at it), and val clips whose label never occurs in train count in the
    accuracy as wrong: an embedding that separates the genders gets the 10 known clips right,
    10 / 12 in all."""
    rng = np.random.default_rng(0)

    def split(genders):
        clips, mel = [], []
        for i, gender in enumerate(genders):
            x = rng.normal(0, 0.1, (4, 6)).astype(np.float32)
            x[:, 0] += {"female": 1.0, "male": -1.0, "child": 3.0}[gender]
            clips.append({"offset": 4 * i, "frames": 4, "labels": {"gender": gender}})
            mel.append(x)
        return {"clips": clips, "mel": np.concatenate(mel)}

    data = {"train": split(["female"] * 30 + ["male"] * 10),
            "val": split(["male"] * 8 + ["female"] * 2 + ["child"] * 2),
            "max_frames": 4, "pad": "repeat"}
    assert pengi.linear_probe(MeanEmbedding(), data, "val", "gender") == pytest.approx(10 / 12)
    got = pengi.probe_metrics(MeanEmbedding(), data, "val", "gender", 2000)
    assert got["probe_acc_gender"] == pytest.approx(10 / 12)
    assert got["probe_majority_gender"] == pytest.approx(2 / 12)


def test_qa_probe_per_question_against_a_count():
    """qa_probe fits one classifier per question: a question whose answer the embedding separates
    is answered right, a question with one training answer gets it, and an answer or a question
    never seen in training counts as wrong. Counted by hand: of 25 val questions, 10 + 10 + 0
    right; the training clips' most common answer per question: 6 + 10 + 0 (a question never
    asked in training has none)."""
    rng = np.random.default_rng(0)

    def split(counts, sounds, extra=0):
        clips, mel = [], []
        for i, (count, sound) in enumerate(zip(counts, sounds)):
            x = rng.normal(0, 0.1, (4, 6)).astype(np.float32)
            x[:, 0] += {"one": -1.0, "two": 1.0, "three": 3.0}[count]
            qa = [{"q": "how many beeps?", "a": count}, {"q": "what sound is this?", "a": sound}]
            if i < extra:
                qa.append({"q": "who is there?", "a": "leo"})
            clips.append({"offset": 4 * i, "frames": 4, "labels": {}, "qa": qa})
            mel.append(x)
        return {"clips": clips, "mel": np.concatenate(mel)}

    data = {"train": split(["one", "two"] * 25 + ["one"] * 10, ["beep"] * 60),
            "val": split(["one"] * 6 + ["two"] * 4 + ["three"] * 2,
                         ["beep"] * 10 + ["siren"] * 2, extra=1),
            "max_frames": 4, "pad": "repeat"}
    acc, constant = pengi.qa_probe(MeanEmbedding(), data, "val")
    assert acc == pytest.approx(20 / 25) and constant == pytest.approx(16 / 25)
    got = pengi.probe_metrics(MeanEmbedding(), data, "val", "qa", 2000)
    assert got == {"probe_acc_qa": acc, "probe_majority_qa": constant}
    # an embedding that holds nothing: each question gets one answer for every clip
    data["val"]["mel"] = np.zeros_like(data["val"]["mel"])
    acc0, _ = pengi.qa_probe(MeanEmbedding(), data, "val")
    assert round(acc0 * 25) in (14, 16)  # "one" (6 right) or "two" (4) to all counts, "beep" (10)


def test_fit_logistic_separates():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 8, generator=g) * 3
    y = torch.arange(200) % 4
    x = centers[y] + torch.randn(200, 8, generator=g) * 0.3
    predict = pengi.fit_logistic(x[:100], y[:100], 4)
    assert (predict(x[100:]) == y[100:]).float().mean() == 1.0


def test_fit_logistic_predicts_each_query_on_the_training_scale():
    """Queries are standardised with the training features' mean and spread: a query's class does
    not depend on the other queries it comes with, and a feature whose spread is tiny next to
    another's still separates the classes (standardised, the weight decay does not erase it)."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 2
    x = torch.stack([(2 * y - 1) * 1e-3 + 1e-4 * torch.randn(200, generator=g),
                     100 * torch.randn(200, generator=g)], 1)
    predict = pengi.fit_logistic(x[:100], y[:100], 2)
    assert torch.equal(predict(x[100:]), y[100:])
    assert torch.equal(torch.cat([predict(x[i:i + 1]) for i in range(100, 200)]), y[100:])


def test_linear_probe_fits_on_the_first_max_clips_training_clips():
    """linear_probe reads the first max_clips labelled training clips: here the first 20 map
    feature +1 to "a" and -1 to "b", the 40 after them the other way round, so the probe of 20
    clips gets every val clip (the first mapping) right and that of 60 clips few (it follows the
    later clips' mapping). It scores the first max_clips val clips as well."""
    rng = np.random.default_rng(0)

    def split(labels, signs):
        clips, mel = [], []
        for i, (label, sign) in enumerate(zip(labels, signs)):
            x = rng.normal(0, 0.1, (4, 6)).astype(np.float32)
            x[:, 0] += sign
            clips.append({"offset": 4 * i, "frames": 4, "labels": {"class": label}})
            mel.append(x)
        return {"clips": clips, "mel": np.concatenate(mel)}

    labels = ["a", "b"] * 30
    signs = [1.0 if (label == "a") == (i < 20) else -1.0 for i, label in enumerate(labels)]
    data = {"train": split(labels, signs), "val": split(["a", "b"] * 5, [1.0, -1.0] * 5),
            "max_frames": 4, "pad": "repeat"}
    assert pengi.linear_probe(MeanEmbedding(), data, "val", "class", max_clips=20) == 1.0
    assert pengi.linear_probe(MeanEmbedding(), data, "val", "class", max_clips=60) < 0.5
    # and it scores the first max_clips val clips: here the first 10 follow the training
    # mapping, the 20 after them the other one
    data["train"] = split(["a", "b"] * 10, [1.0, -1.0] * 10)
    val = ["a", "b"] * 15
    data["val"] = split(val, [(1.0 if label == "a" else -1.0) * (1 if i < 10 else -1)
                              for i, label in enumerate(val)])
    assert pengi.linear_probe(MeanEmbedding(), data, "val", "class", max_clips=10) == 1.0


def test_task_mix_from_templates(synth_dir):
    """Every task of the synth corpus comes through the paper's templates, in one mix."""
    tok = tokenizer.load_tokenizer(synth_dir, "corpus")
    cfg = pengi.PengiConfig(max_frames=64)
    data = pengi.load_data(synth_dir, cfg, tok)
    prompts = {t: {tok.decode(p) for _, p, _ in ex} for t, ex in data["train"]["by_task"].items()}
    assert {"caption", "metadata", "class", "qa",
            "instrument"} <= set(prompts) and ({"pitch", "chord"} & set(prompts))
    for task in ("caption", "metadata", "class", "instrument"):
        assert prompts[task] == {pengi.PROMPTS[task]}
    assert all(p.startswith("question: ") for p in prompts["qa"])
    clip = next(c for c in data["train"]["clips"] if "class" in c["labels"])
    assert ("class", "this is a sound of",
            clip["labels"]["class"]) in pengi.clip_tasks(clip, data["tasks"])
    # a music clip: each music task (one per label key) answers the clip's own label of that key
    ci, clip = next((i, c) for i, c in enumerate(data["train"]["clips"]) if c["kind"] == "music")
    keys = [k for k in pengi.MUSIC_KEYS if k in clip["labels"]]
    assert len(keys) >= 2
    music = {t: a for t, _, a in pengi.clip_tasks(clip, data["tasks"]) if t in pengi.MUSIC_KEYS}
    assert music == {k: clip["labels"][k] for k in keys}
    assert all([tok.decode(a).strip() for i, _, a in data["train"]["by_task"][k] if i == ci]
               == [clip["labels"][k]] for k in keys)
    # metadata: the kind, the labels sorted by key, then the transcript
    hand = {"kind": "speech", "labels": {"speaker": "m1", "gender": "male"}, "transcript": "hi"}
    assert pengi.metadata_text(hand) == "kind: speech; gender: male; speaker: m1; text: hi"
    assert (pengi.metadata_text({**hand, "transcript": None})
            == "kind: speech; gender: male; speaker: m1")
    b = pengi.get_batch(data, "train", 64, np.random.default_rng(0))
    assert b["mel"].shape == (64, 64, cfg.n_mels) and b["mel"].dtype == torch.float32
    n = (b["targets"] != -1).sum(1)
    assert (b["targets"][torch.arange(64), n - 1] == cfg.eot_token).all()
    seen = {tok.decode(b["prompt"][i, :b["prompt_lens"][i]].tolist()) for i in range(64)}
    # several tasks in one batch
    assert len({p for p in seen if not p.startswith("question: ")}) >= 4
    with pytest.raises(ValueError, match="unknown"):
        pengi.load_data(synth_dir, pengi.PengiConfig(tasks="class,emotion"), tok)


class Bytes:
    """A tokenizer for tests: bytes are tokens, 256 ends."""
    n_vocab, eot_token = 257, 256

    def encode(self, text):
        return list(text.encode())


def write_clips(folder, splits, n_mels=16):
    """A prepared-data folder of silent clips: {split: [clip records without offsets]}."""
    (folder / "meta.json").write_text(json.dumps({"n_mels": n_mels}))
    for split, rows in splits.items():
        offsets = np.cumsum([0] + [c["frames"] for c in rows])
        np.zeros((offsets[-1], n_mels), np.float16).tofile(folder / f"{split}_mel.bin")
        (folder / f"{split}_clips.jsonl").write_text(
            "".join(json.dumps({**c, "offset": int(o)}) + "\n" for c, o in zip(rows, offsets)))


def test_split_without_the_tasks_named(tmp_path):
    """A split none of whose clips offers a task of the mix is named by load_data (get_batch would
    fail with numpy's "high <= 0")."""
    clips = [{"kind": "speech", "frames": 10, "labels": {"class": "speech"},
              "qa": [{"q": "who?", "a": "a man"}]},
             {"kind": "music", "frames": 12, "labels": {"class": "piano"}}]
    write_clips(tmp_path, {"train": clips, "val": clips[1:]})  # no question in val
    tok = Bytes()
    with pytest.raises(ValueError, match="the val split's clips offer none of the tasks 'qa'"):
        pengi.load_data(str(tmp_path), pengi.PengiConfig(tasks="qa"), tok)
    data = pengi.load_data(str(tmp_path), pengi.PengiConfig(tasks="qa,class"), tok)
    assert sorted(data["val"]["by_task"]) == ["class"]


def test_task_weights_set_the_mix(synth_dir):
    """task_weights draws tasks in proportion (a chi-square-sized tolerance over 4000 draws); no
    weights keeps the uniform draw and its random stream; bad names and values are errors."""
    tok = tokenizer.load_tokenizer(synth_dir, "corpus")
    uniform = pengi.load_data(synth_dir, pengi.PengiConfig(max_frames=16), tok)
    weighted = pengi.load_data(synth_dir, pengi.PengiConfig(max_frames=16,
                                                            task_weights="class=4, caption=0"), tok)
    tasks = sorted(weighted["train"]["by_task"])
    prompt_task = {}
    for t, ex in weighted["train"]["by_task"].items():
        for _, p, _ in ex:
            prompt_task[tuple(p)] = t
    b = pengi.get_batch(weighted, "train", 4000, np.random.default_rng(0))
    drawn = Counter(prompt_task[tuple(b["prompt"][i, :b["prompt_lens"][i]].tolist())]
                    for i in range(4000))
    w = {t: {"class": 4.0, "caption": 0.0}.get(t, 1.0) for t in tasks}
    for t in tasks:
        expected = 4000 * w[t] / sum(w.values())
        assert abs(drawn[t] - expected) <= 4 * expected ** 0.5 + 1, (t, drawn[t], expected)
    assert drawn["caption"] == 0
    # "" keeps the uniform draw, consuming the random stream as it always did
    a = pengi.get_batch(uniform, "train", 8, np.random.default_rng(3))
    rng = np.random.default_rng(3)
    first = uniform["train"]["by_task"][tasks[rng.integers(len(tasks))]]
    i, p, _ = first[rng.integers(len(first))]
    assert a["prompt"][0, :len(p)].tolist() == p
    for spec, match in [("emotion=2", "not a task of the mix"), ("pitch=x", "needs a number"),
                        ("pitch=-1", ">= 0"), (",".join(f"{t}=0" for t in tasks), "weighs 0"),
                        ("qa=1, qa=2", "'qa' is named twice")]:
        with pytest.raises(ValueError, match=match):
            pengi.load_data(synth_dir, pengi.PengiConfig(task_weights=spec), tok)
    with pytest.raises(ValueError, match="not a task of the mix"):  # pitch, but music is not mixed
        pengi.load_data(synth_dir, pengi.PengiConfig(tasks="class", task_weights="pitch=2"), tok)
    for spec in (",", "", "qa,class,qa"):  # no task, or one twice: named as the list's fault
        with pytest.raises(ValueError, match=f"tasks={spec!r}: name each task of the mix once"):
            pengi.load_data(synth_dir, pengi.PengiConfig(tasks=spec, task_weights="qa=2"), tok)


def test_task_weights_follow_each_task_whatever_order_the_clips_list_them(tmp_path):
    """get_batch draws each task with its own weight also when the clips offer the tasks in another
    order than the sorted one the weights are stored in (here qa first, from clip 0, then class):
    class=0 leaves qa alone drawn."""
    clips = [{"kind": "speech", "frames": 10, "labels": {}, "qa": [{"q": "who?", "a": "a man"}]},
             {"kind": "music", "frames": 12, "labels": {"class": "piano"}}]
    write_clips(tmp_path, {"train": clips, "val": clips})
    data = pengi.load_data(str(tmp_path), pengi.PengiConfig(tasks="qa,class", max_frames=16,
                                                            task_weights="class=0"), Bytes())
    assert list(data["train"]["by_task"]) == ["qa", "class"]
    b = pengi.get_batch(data, "train", 20, np.random.default_rng(0))
    qa = list(pengi.QA_PROMPT.encode() + b"who?")
    assert all(b["prompt"][i, :b["prompt_lens"][i]].tolist() == qa for i in range(20))


@pytest.mark.parametrize("name", ["corpus", "gpt2"])
def test_one_data_dir_serves_both_tokenizers(synth_dir, name):
    """The prepared data is text: with tokenizer="gpt2" (GPT-2 base's vocabulary) or "corpus" (the
    small CPU LM's), every prompt and answer of the task mix decodes back to the stored text; vocab
    and eot come from the tokenizer."""
    tok = tokenizer.load_tokenizer(synth_dir, name, offline=True)
    cfg = tiny_config(n_mels=64, tokenizer=name, vocab_size=0, eot_token=-1, llm_block_size=1024,
                      max_prompt_tokens=1000, max_answer_tokens=1000)
    data = pengi.load_data(synth_dir, cfg, tok)
    assert (cfg.vocab_size, cfg.eot_token) == (tok.n_vocab, tok.eot_token)
    clips, n = data["train"]["clips"], 0
    for task, examples in data["train"]["by_task"].items():
        for i, p, a in examples:  # answers as the LM saw words in running text: after a space
            clip_examples = pengi.clip_tasks(clips[i], data["tasks"])
            assert (tok.decode(a).startswith(" ")
                    and (task, tok.decode(p), tok.decode(a)[1:]) in clip_examples)
            n += 1
    assert n >= len(clips)
    b = pengi.get_batch(data, "train", 4, np.random.default_rng(0))
    assert (b["targets"] == tok.eot_token).sum() == 4
    torch.manual_seed(0)
    logits, loss = pengi.Pengi(cfg)(**b)
    assert logits.size(-1) == tok.n_vocab and torch.isfinite(loss)


def write_random_llm(path, vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=64, std=0.3,
                     seed=0):
    """A random LM in the salmonn stage-llm ckpt.pt format, with weights large enough to give peaked
    logits (GPT-2's 0.02 init gives near-uniform ones, which no prefix can steer)."""
    torch.manual_seed(seed)
    lm = pengi.GPT2(vocab_size, n_layer, n_head, n_embd, block_size)
    for p in lm.parameters():
        if p.dim() >= 2:
            p.data.normal_(0, std)
    torch.save({"model": {"llm." + k: v for k, v in lm.state_dict().items()},
                "model_args": {"llm_n_layer": n_layer, "llm_n_head": n_head, "llm_n_embd": n_embd,
                               "llm_block_size": block_size, "vocab_size": vocab_size,
                               "stage": "llm"}}, path)


def pretrain_small_llm(path, data, tok, steps=150, n_layer=2, n_head=2, n_embd=32, block_size=64,
                       seed=0):
    """A small LM text-pretrained on the fixture's training text (every prompt followed by its
    answer, as salmonn's stage "llm" does), saved in the salmonn stage-llm ckpt.pt format."""
    torch.manual_seed(seed)
    lm = pengi.GPT2(tok.n_vocab, n_layer, n_head, n_embd, block_size)
    for mod in lm.modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(mod.weight, std=0.02)
    docs = [p + a + [tok.eot_token] for ex in data["train"]["by_task"].values() for _, p, a in ex]
    stream = torch.tensor([t for d in docs for t in d][: 200_000])
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        i = torch.randint(0, len(stream) - block_size - 1, (16,), generator=g)
        x = torch.stack([stream[j:j + block_size + 1] for j in i.tolist()])
        h, _ = lm(lm.wte(x[:, :-1]))
        loss = F.cross_entropy(lm.lm_head(h).reshape(-1, tok.n_vocab), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save({"model": {"llm." + k: v for k, v in lm.state_dict().items()},
                "model_args": {"llm_n_layer": n_layer, "llm_n_head": n_head, "llm_n_embd": n_embd,
                               "llm_block_size": block_size, "vocab_size": tok.n_vocab,
                               "stage": "llm"}}, path)
    return loss.item()


def test_learns_close_ended_task(synth_dir, tmp_path):
    """A CPU-sized Pengi learns "this is a sound of" on the synth fixture with a text-pretrained
    small LM (the case that failed while the prefixes were ~20-100x the LM's token scale): on
    held-out clips the generated label and likelihood ranking (raw and PMI) score well above chance,
    on the training clips well above the untrained model's (seed 0: 0.00-0.03 -> 0.67-0.92 over the
    three scores), and PMI far above always answering the most common class (6 of the 14 val
    clips; measured 0.86-0.93 over seeds 0 and 1). 14 clips are too few to part the generated and
    raw-ranked labels (0.50-0.57) from that constant answer, so those two are also scored on the
    training clips, whose audio they must tell apart to beat it (measured 0.60-0.68 against 0.35,
    seeds 0 and 1; torch 2.13). evaluate's probe_acc is the class probe of the val clips; that
    it learnt is not checked: on the fixture's 14 val clips the untrained encoder's random features
    already give 0.71-0.86 and the trained one's was tied or lower in 3 of 12 seeds tried. sample()
    writes generate's answer with the same options and ranks the candidates by rank_candidates'
    scores of their answer_ids (leading space), best first."""
    tok = tokenizer.load_tokenizer(synth_dir, "corpus")
    cfg = pengi.PengiConfig(tasks="class", max_frames=128, enc_dim=16, enc_depths="1,1",
                            enc_heads="2,2", window=8, d_embed=32, prefix_len=4, map_n_layer=1,
                            map_n_head=2, text_n_layer=1, dropout=0.0, clap_weight=1.0)
    data = pengi.load_data(synth_dir, cfg, tok)  # (no LM yet: its sizes come below)
    lm_data = pengi.load_data(synth_dir, pengi.PengiConfig(tasks="caption,class,qa"), tok)
    lm_loss = pretrain_small_llm(tmp_path / "llm.pt", lm_data, tok)
    assert lm_loss < 2.5, lm_loss  # it has learnt the text
    cfg.llm_init = str(tmp_path / "llm.pt")
    pengi.set_llm_dims(cfg)
    torch.manual_seed(0)
    m = pengi.Pengi(cfg)
    pengi.init_pretrained(m)
    close = ("class_acc_gen", "class_acc_rank", "class_acc_pmi")
    before = pengi.evaluate(m, data, tok, "train", max_clips=60, beam=1, probe=False)
    train_steps(m, data, 600, lr=3e-3)
    metrics = pengi.evaluate(m, data, tok, "val", max_clips=60, beam=1, probe=True)
    seen = pengi.evaluate(m, data, tok, "train", max_clips=60, beam=1, probe=False)
    assert m.training  # evaluate restores the mode it found
    print(metrics)
    chance = metrics["class_chance"]
    assert chance < 0.15, metrics
    assert metrics["class_acc_gen"] >= 3 * chance, metrics
    assert (metrics["class_acc_rank"] >= 3 * chance
            and metrics["class_acc_pmi"] >= 3 * chance), metrics
    # it learnt them (on 60 training clips: the 14 held-out ones move by a clip across CPUs)
    assert all(seen[k] >= before[k] + 0.15 for k in close), (before, seen)
    assert metrics["class_acc_pmi"] >= metrics["class_majority"] + 0.25, metrics
    assert all(metrics[k] >= metrics["class_majority"] for k in close), metrics
    assert all(seen[k] >= seen["class_majority"] + 0.2 for k in close), seen
    assert metrics["probe_acc"] == pengi.in_eval_mode(m, pengi.linear_probe, m, data, "val",
                                                      "class")
    assert 0.5 < metrics["prefix_norm_ratio_audio"] < 2, metrics
    m.eval()
    clip = data["val"]["clips"][0]
    audio = {"mel": torch.from_numpy(pengi.clip_mel(data["val"]["mel"], clip, 128)),
             "codes": torch.zeros(1, 1, dtype=torch.long)}
    out = pengi.sample(m, tok, audio, "this is a sound of", None, beam=3, max_new_tokens=6,
                       candidates="|".join(data["candidates"]["class"] * 2))  # each given twice
    # redone here: the clip's first 128 frames, the prompt's ids, each label once after a space
    mel = torch.from_numpy(pengi.clip_mel(data["val"]["mel"], clip, 128))[None]
    p = torch.tensor([tok.encode("this is a sound of")])
    labels = data["candidates"]["class"]
    lp = m.rank_candidates(mel, p, torch.tensor([p.size(1)]),
                           [tok.encode(" " + c) for c in labels])[0].tolist()
    scores = [s for _, s in out["ranked"]]
    assert sorted(c for c, _ in out["ranked"]) == sorted(labels)  # once each
    assert scores == sorted(scores, reverse=True) and scores[0] > scores[-1]
    for c, s in out["ranked"]:
        assert s == pytest.approx(lp[labels.index(c)], abs=1e-3), c  # sample() rounds to 3 places
    ids = m.generate(mel, p, torch.tensor([p.size(1)]), beam=3, max_new_tokens=6,
                     length_penalty=1.0)[0]
    assert out["text"] == (tok.decode(ids).strip()
                           + "\nranked by log p(label | audio, prompt): "
                           + ", ".join(f"{c} ({s})" for c, s in out["ranked"]))
    assert out["prompt"] == "this is a sound of"
    # without a prompt: the captioning one, said in the result
    no_prompt = pengi.sample(m, tok, {"mel": mel[0]}, None, None, beam=1, max_new_tokens=4)
    assert no_prompt["prompt"] == pengi.PROMPTS["caption"] and no_prompt["text"] == pengi.sample(
        m, tok, {"mel": mel[0]}, pengi.PROMPTS["caption"], None, beam=1, max_new_tokens=4)["text"]
    with pytest.raises(ValueError, match="unknown option"):
        pengi.sample(m, tok, {"mel": torch.zeros(10, 64)}, None, None, temprature=0.5)
    with pytest.raises(ValueError, match="more than the text tower read in training"):
        pengi.sample(m, tok, {"mel": torch.zeros(10, 64)}, "question: " + "why " * 100, None)
    with pytest.raises(ValueError, match="candidates='\\|' names no labels"):
        pengi.sample(m, tok, {"mel": torch.zeros(10, 64)}, None, None, candidates="|")
    # commas do not separate labels: one label is nothing to rank
    with pytest.raises(ValueError, match="names 1 label; ranking needs two or more, separated by"):
        pengi.sample(m, tok, {"mel": torch.zeros(10, 64)}, None, None, candidates="siren,bell")
    with pytest.raises(ValueError, match="unknown task"):
        pengi.evaluate(m, data, tok, "val", tasks="class,emotion")
    with pytest.raises(ValueError, match=r"task\(s\) \['pitch'\] are not among this model's "
                                         r"tasks \(class\)"):  # a known task it was not given
        pengi.evaluate(m, data, tok, "val", tasks="class,pitch")
    with pytest.raises(ValueError, match="probe_clips=1: must be at least 2"):  # a probe fits on 2+
        pengi.evaluate(m, data, tok, "val", probe_clips=1)


@torch.no_grad()
def test_evaluation_cuts_prompts_where_training_cut_them(monkeypatch):
    """load_data cuts every prompt to its first max_prompt_tokens ids for training; evaluation
    (generate and rank_candidates, via label_metrics) must give the text tower the same ids, not
    the whole prompt ("this is a sound of": 5 ids, cut to 2)."""
    m = tiny_model(max_prompt_tokens=2)
    data, tok = tiny_label_data(), WordIds()
    want = tok.encode(pengi.PROMPTS["class"])
    assert len(want) == 5
    seen = []
    for name in ("generate", "rank_candidates"):
        real = getattr(m, name)

        def spy(mel, prompt, lens, *a, _real=real, **kw):
            seen.append([p[:n].tolist() for p, n in zip(prompt, lens.tolist())])
            return _real(mel, prompt, lens, *a, **kw)
        monkeypatch.setattr(m, name, spy)
    pengi.label_metrics(m, data, tok, data["val"], "class", max_clips=3, bs=3,
                        gen=dict(beam=1, max_new_tokens=2, length_penalty=1.0), prior_clips=2)
    assert len(seen) == 3  # generate, then rank_candidates on val and on the prior's clips
    assert all(rows == [want[:2]] * len(rows) for rows in seen)


def test_sample_takes_a_prompt_of_max_prompt_tokens_and_refuses_one_more():
    m = tiny_model(max_prompt_tokens=3)
    audio, tok = {"mel": torch.randn(20, m.config.n_mels)}, WordIds()
    pengi.sample(m, tok, audio, "a b c", None, beam=1, max_new_tokens=1)  # 3 ids: fits
    with pytest.raises(ValueError, match=r"the prompt has 4 tokens, more than .*"
                                         r"max_prompt_tokens=3"):
        pengi.sample(m, tok, audio, "a b c d", None, beam=1, max_new_tokens=1)


def test_text_tower_deeper_than_the_lm_named():
    """text_init='llm' copies the LM's first text_n_layer layers: one more than the LM has is a
    ValueError naming both, at construction (not an IndexError from the copy)."""
    pengi.Pengi(tiny_config(text_n_layer=2, llm_n_layer=2))
    with pytest.raises(ValueError, match="text_n_layer 3 > llm_n_layer 2"):
        pengi.Pengi(tiny_config(text_n_layer=3, llm_n_layer=2))
    pengi.Pengi(tiny_config(text_n_layer=3, llm_n_layer=2, text_init="random"))  # nothing copied


@torch.no_grad()
def test_clap_loss_shares_positives_when_duplicate_answers_embed_apart(monkeypatch):
    """In training, dropout gives two clips with the same answer two different text embeddings;
    clap_loss must then still treat each as a positive of both clips (P uniform over the clips
    with the same answer), not only its own diagonal. The text embeddings are stubbed here with
    distinct unit vectors, and the loss written out in float64."""
    temp = 0.2
    answers = [[5, 6, 7], [8, 9], [5, 6, 7], [10]]  # clips 0 and 2 share theirs
    B, cfg = len(answers), tiny_config(stage="clap", clap_temp=temp)
    m = tiny_model(stage="clap", clap_temp=temp)
    b = pengi.collate([np.zeros((cfg.max_frames, cfg.n_mels), np.float32)] * B, [[1, 2]] * B,
                      answers, cfg.eot_token)
    g = torch.Generator().manual_seed(1)
    audio = F.normalize(torch.randn(B, cfg.d_embed, generator=g), dim=-1)
    text = F.normalize(torch.randn(B, cfg.d_embed, generator=g), dim=-1)
    monkeypatch.setattr(m, "embed_text", lambda prompt, lens: text)
    loss = m.clap_loss(audio, b["answer"], b["targets"]).item()
    S = (audio.double() @ text.double().T / temp).tolist()
    shared = [[j for j in range(B) if answers[j] == answers[i]] for i in range(B)]
    own = [[i] for i in range(B)]
    cols = [list(c) for c in zip(*S)]
    ref = 0.5 * (soft_target_ce(S, shared) + soft_target_ce(cols, shared))
    diagonal = 0.5 * (soft_target_ce(S, own) + soft_target_ce(cols, own))
    assert abs(ref - diagonal) > 1e-3  # the shared positives matter on this batch
    assert loss == pytest.approx(ref, abs=1e-5)


@torch.no_grad()
def test_greedy_stops_at_eot_and_leaves_it_out():
    """Greedy decoding redone without a KV cache, one full forward pass per token: each row takes
    the argmax until it emits eot (left out of its answer) or has max_new tokens. On peaked tiny
    models (6 tokens, eot = 5) some rows of a batch end early, others do not."""
    b = tiny_batch(tiny_config())
    max_new, ended_early, ran_full = 4, 0, 0
    for seed in range(6):
        m = tiny_model(seed, vocab_size=6, eot_token=5)
        for p in m.llm.parameters():
            p.data.normal_(0, 0.6)
        pre = m.prefix(b["mel"], b["prompt"] % 5, b["prompt_lens"])
        want = []
        for i in range(pre.size(0)):
            toks = []
            while len(toks) < max_new:
                x = torch.cat([pre[i:i + 1], m.llm.wte(torch.tensor([toks], dtype=torch.long))], 1)
                nxt = m.llm.lm_head(m.llm(x)[0][:, -1]).argmax(-1).item()
                if nxt == 5:
                    break
                toks.append(nxt)
            want.append(toks)
            ended_early += len(toks) < max_new
            ran_full += len(toks) == max_new
        assert m.greedy(pre, max_new) == want
        assert m.generate(b["mel"], b["prompt"] % 5, b["prompt_lens"], beam=1,
                          max_new_tokens=max_new) == want
    assert ended_early > 0 and ran_full > 0


@torch.no_grad()
def test_label_chance_is_one_over_the_candidates_whatever_labels_are_evaluated():
    """{key}_chance is 1 / the number of candidate labels (the training split's), also when the
    evaluated clips show fewer of them (here max_clips=1: one val clip, "dog", of 3 candidates)."""
    m = tiny_model()
    data, tok = tiny_label_data(), WordIds()
    for max_clips in (1, 2):
        got = pengi.label_metrics(m, data, tok, data["val"], "class", max_clips=max_clips, bs=2,
                                  gen=dict(beam=1, max_new_tokens=2, length_penalty=1.0),
                                  prior_clips=2)
        assert got["class_chance"] == pytest.approx(1 / 3)


def test_bleu4_clips_each_ngram_by_its_largest_count_in_one_reference():
    """With several references an n-gram is clipped at its count in the reference that holds it
    most often, not at the counts summed over references: "a" twice in the hypothesis, once in
    each reference -> p1 5/6 (not 6/6); p2 4/5, p3 3/4, p4 2/3 against "a b c d e"; closest
    reference length 5 for 6 words: no brevity penalty."""
    got = pengi.bleu4(["a a b c d e"], [["a b c d e", "a q"]])
    assert got == pytest.approx((5 / 6 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25)


def test_linear_probe_needs_two_labels_in_training():
    """The probe's classes come from the training split alone: a key with one training label
    gives no probe (None), even where the evaluated split holds a second label."""
    rng = np.random.default_rng(0)

    def split(labels):
        clips = [{"offset": 4 * i, "frames": 4, "labels": {"class": a}}
                 for i, a in enumerate(labels)]
        return {"clips": clips, "mel": rng.normal(0, 1, (4 * len(labels), 6)).astype(np.float32)}
    data = {"train": split(["a"] * 6), "val": split(["a", "b"] * 3), "max_frames": 4,
            "pad": "repeat"}
    assert pengi.linear_probe(MeanEmbedding(), data, "val", "class") is None
    assert pengi.probe_metrics(MeanEmbedding(), data, "val", "class", 2000) == {}


@torch.no_grad()
def test_prefix_norm_ratio_is_the_mean_vector_norm_over_the_mean_token_norm():
    """prefix_norm_ratio = mean over prefix vectors of their norm / mean over the LM's token
    embeddings of theirs, written out; the vectors' norms are spread here (at init the mapper's
    LayerNorm gives every vector the same norm, where a max or a median would pass too)."""
    m = tiny_model()
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(2, 6, 16, generator=g) * torch.rand(2, 6, 1, generator=g) * 5
    want = (sum(pre[b, i].norm().item() for b in range(2) for i in range(6)) / 12) / \
        (sum(row.norm().item() for row in m.llm.wte.weight) / m.llm.wte.weight.size(0))
    assert m.prefix_norm_ratio(pre) == pytest.approx(want, rel=1e-5)


def bigram_logp(table, V):
    """log-probs (V,) from {token: prob} (the rest spread evenly over the other tokens)."""
    p = torch.full((V,), (1 - sum(table.values())) / (V - len(table)))
    for t, q in table.items():
        p[t] = q
    return p.log()


def test_beam_search_gives_an_ended_beam_one_slot():
    """A beam that has emitted eot continues only as itself: on a scripted bigram LM (tokens A=0,
    B=1, X=2, eot=3) where eot is most often followed by X, copies of the ended beam "eot" + X
    would outscore the live beam "A B" at step 2 and crowd it out of a beam of 2. The best
    sequence by log p / length (eot counted) is "A B eot": (log .3 + log .6 + log .99) / 3 =
    -0.58, above "eot" (log .5 = -0.69)."""
    V, eot = 4, 3
    after = {0: {1: 0.6, 3: 0.3}, 1: {3: 0.99}, 2: {3: 0.9}, 3: {2: 0.99}}
    logp0 = bigram_logp({3: 0.5, 0: 0.3, 1: 0.19}, V)[None]

    def step(tokens, past):
        return torch.stack([bigram_logp(after[t], V) for t in tokens.tolist()]), past
    assert pengi.clipcap_beam_search(step, logp0, [], 2, 3, eot, 1.0) == [0, 1]


def test_greedy_rows_that_ended_take_no_more_tokens():
    """Batched greedy decoding on a scripted bigram LM (A=0, B=1, X=2, eot=3): row 0 says A then
    eot, row 1 says B X X X; after row 0's eot the LM would go on with B X, which row 0's answer
    must not take while row 1 runs on."""
    V, eot = 4, 3
    nxt = {0: 3, 3: 1, 1: 2, 2: 2}

    def peaked_at_next(tokens):
        return torch.stack([bigram_logp({nxt[t]: 0.97}, V) for t in tokens])
    stub = types.SimpleNamespace(
        config=types.SimpleNamespace(eot_token=eot),
        last_logp=lambda prefix, past=None: (torch.stack([bigram_logp({0: 0.97}, V),
                                                          bigram_logp({1: 0.97}, V)]), []),
        next_logp=lambda tokens, past: (peaked_at_next(tokens.tolist()), past))
    assert pengi.Pengi.greedy(stub, torch.zeros(2, 1, 1), 4) == [[0], [1, 2, 2, 2]]


def qa_split(answers):
    """A split of 4-frame silent clips, each asked "loud?" with its answer."""
    clips = [{"offset": 4 * i, "frames": 4, "labels": {}, "qa": [{"q": "loud?", "a": a}]}
             for i, a in enumerate(answers)]
    return {"clips": clips, "mel": np.zeros((4 * len(answers), 6), dtype=np.float32)}


def test_qa_probe_majority_is_the_training_answer():
    """probe_majority_qa answers each question with its most common training answer ("yes", 5 of
    6), not the evaluated split's own ("no", 3 of 4): 1 of the 4 val questions."""
    data = {"train": qa_split(["yes"] * 5 + ["no"]), "val": qa_split(["no", "no", "yes", "no"]),
            "max_frames": 4, "pad": "repeat"}
    _, constant = pengi.qa_probe(MeanEmbedding(), data, "val")
    assert constant == pytest.approx(1 / 4)


@torch.no_grad()
def test_sample_ranks_candidates_best_first():
    """sample's candidates come back ordered by rank_candidates' log p, highest first, each
    label once."""
    m = tiny_model(2)
    for p in m.llm.parameters():
        p.normal_(0, 0.6)
    m.init_from_lm()
    tok = WordIds()
    mel = torch.randn(1, 32, 16, generator=torch.Generator().manual_seed(2))
    labels = ["dog", "cat bark", "bird", "car horn"]
    got = pengi.sample(m, tok, {"mel": mel[0]}, None, None, beam=1, max_new_tokens=2,
                       candidates="|".join(labels + ["dog"]))
    p = torch.tensor([tok.encode(pengi.PROMPTS["caption"])])
    lp = m.rank_candidates(mel, p, torch.tensor([p.size(1)]),
                           [tok.encode(" " + c) for c in labels])[0]
    want = sorted(zip(labels, lp.tolist()), key=lambda t: -t[1])
    assert [c for c, _ in got["ranked"]] == [c for c, _ in want]
    assert [s for _, s in got["ranked"]] == pytest.approx([s for _, s in want], abs=1e-3)


def test_qa_probe_reads_the_first_max_clips_clips_of_each_split():
    """qa_probe uses the first max_clips clips with QA of each split: with 4, training holds only
    "yes" (the 20 "no" clips after it are left out), so every question is answered "yes", right
    on 2 of the first 4 val clips (the last 2 val clips, "no", are left out too)."""
    data = {"train": qa_split(["yes"] * 4 + ["no"] * 20),
            "val": qa_split(["yes"] * 2 + ["no"] * 4),
            "max_frames": 4, "pad": "repeat"}
    assert pengi.qa_probe(MeanEmbedding(), data, "val", max_clips=4) == (0.5, 0.5)


def tiny_run(tmp_path):
    """A run folder with a tiny Pengi checkpoint as train.py writes it, its tokenizer (a byte-level
    corpus BPE) recorded in it, and a 1 s tone: sample.py --audio runs on it without any data."""
    tok = tokenizer.make_encoding("corpus", {bytes([i]): i for i in range(256)})
    cfg = tiny_config(n_mels=64, vocab_size=257, eot_token=256, llm_block_size=64)
    torch.manual_seed(0)
    m = pengi.Pengi(cfg)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"model": m.state_dict(), "model_name": "pengi", "model_args": asdict(cfg),
                "iter_num": 0, "config": {"data_dir": str(tmp_path / "no_data")},
                "tokenizer": tokenizer.tokenizer_record(tok)}, run / "ckpt.pt")
    t = np.arange(24000) / 24000
    soundfile.write(tmp_path / "tone.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32),
                    24000)
    return run, tmp_path / "tone.wav"


def sample_py(*args):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return run_script([sys.executable, "sample.py", *map(str, args)], cwd=root,
                      env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


def test_sample_py_refuses_a_seed_torch_cannot_take(tmp_path):
    """A --seed beyond torch.manual_seed's 64 bits is one line naming it (was a traceback: "Overflow
    when unpacking long long"); the ends of the range run."""
    run, wav = tiny_run(tmp_path)
    p = sample_py(f"--out_dir={run}", f"--audio={wav}", "--beam=1", "--max_new_tokens=2",
                  f"--seed={10 ** 23}")
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.strip() == (f"sample.py: --seed={10 ** 23}: out of the range a torch "
                                f"generator takes (-2**63 to 2**64 - 1)")
    for seed in (-2 ** 63, 2 ** 64 - 1):
        p = sample_py(f"--out_dir={run}", f"--audio={wav}", "--beam=1", "--max_new_tokens=2",
                      f"--seed={seed}")
        assert p.returncode == 0, p.stderr


def test_sample_py_names_an_end_of_text_mark_in_the_prompt_or_candidates(tmp_path):
    """<|endoftext|> in --prompt or --candidates is one line naming the setting, before the input is
    read (was tiktoken's five-line refusal, after it, naming neither)."""
    run, wav = tiny_run(tmp_path)
    for arg in ("--prompt=what is it?<|endoftext|>", "--candidates=dog|<|endoftext|>cat"):
        p = sample_py(f"--out_dir={run}", f"--audio={wav}", "--beam=1", "--max_new_tokens=2", arg)
        key, value = arg[2:].split("=", 1)
        assert p.returncode == 2 and p.stderr.strip() == (
            f"sample.py: --{key}={value!r}: holds <|endoftext|>, the tokenizer's end-of-text mark, "
            f"which no text may hold: leave it out"), p.stderr
        assert "input:" not in p.stdout


def test_sample_checks_the_candidates_before_generating(monkeypatch):
    """candidates naming fewer than two labels, or one longer than the LM's block has room for, are
    refused before the answer is generated (it was generated, then thrown away); good ones are
    ranked as before."""
    m, tok = tiny_model(2), WordIds()
    mel = torch.randn(32, 16, generator=torch.Generator().manual_seed(2))
    want = pengi.sample(m, tok, {"mel": mel}, None, None, beam=2, max_new_tokens=3,
                        candidates="dog|cat bark|dog")
    assert [c for c, _ in want["ranked"]] in (["dog", "cat bark"], ["cat bark", "dog"])
    generated = []
    generate = m.generate
    monkeypatch.setattr(m, "generate", lambda *a, **k: generated.append(1) or generate(*a, **k))
    for bad, said in (("dog", "names 1 label"), ("dog||", "names 1 label"),
                      ("dog|" + "cat " * 100, "a candidate of 100 tokens")):
        with pytest.raises(ValueError, match=said):
            pengi.sample(m, tok, {"mel": mel}, None, None, beam=2, candidates=bad)
        assert not generated, bad
    assert pengi.sample(m, tok, {"mel": mel}, None, None, beam=2, max_new_tokens=3,
                        candidates="dog|cat bark|dog") == want


def test_sample_py_checks_the_audio_file_before_loading_the_model(tmp_path):
    """A missing --audio, or a folder, stops sample.py before the checkpoint is loaded (it was
    loaded, and the model built, first: seconds for a large one)."""
    run, wav = tiny_run(tmp_path)
    for audio, said in ((tmp_path / "none.wav", "file not found"),
                        (tmp_path, "a folder, not an audio file")):
        p = sample_py(f"--out_dir={run}", f"--audio={audio}")
        assert p.returncode == 2 and p.stderr.strip() == f"sample.py: --audio={audio}: {said}"
        assert p.stdout == "", p.stdout  # no "pengi: ... parameters", no "pengi from ..."


def test_sample_py_refuses_split_with_audio(tmp_path):
    """--split with --audio is refused as --clip with --audio is (it was ignored: the file was
    sampled, whatever split was asked)."""
    run, wav = tiny_run(tmp_path)
    p = sample_py(f"--out_dir={run}", f"--audio={wav}", "--split=train")
    assert p.returncode == 2 and p.stderr.strip() == (
        f"sample.py: --split=train and --audio={wav}: --split picks a clip of the data (with "
        f"--clip), which --audio replaces; give one or the other"), p.stderr


def test_sample_says_when_the_mix_left_out_the_task_asked(capsys):
    """A trained prompt (or a question, or the default caption prompt) of a task the checkpoint's
    mix left out (tasks, or a weight of 0) gets a note naming the task and the mix (it was answered
    with no word); one of a task in the mix gets none."""
    mel = torch.randn(32, 16, generator=torch.Generator().manual_seed(2))
    for tasks, weights, prompt, task, learned in (
            ("caption,class", "", pengi.QA_PROMPT + "is it loud?", "qa", "caption, class"),
            ("caption,class", "", pengi.PROMPTS["pitch"], "pitch", "caption, class"),
            ("class,music", "", None, "caption", "class, instrument, pitch, chord"),
            ("class,music", "pitch=0", pengi.PROMPTS["pitch"], "pitch", "class, instrument, chord"),
            ("class,music", "", pengi.PROMPTS["pitch"], None, None),
            ("caption,class", "", pengi.PROMPTS["class"], None, None)):
        m = tiny_model(2, tasks=tasks, task_weights=weights)
        pengi.sample(m, WordIds(), {"mel": mel}, prompt, None, beam=1, max_new_tokens=2)
        out = capsys.readouterr().out
        said = (f"pengi.sample: {prompt or pengi.PROMPTS['caption']!r} asks for the {task!r} "
                f"task, which this checkpoint's last training mix left out (its tasks: "
                f"{learned}): the answer may be off")
        assert (said in out) == (task is not None), (tasks, weights, prompt, out)
        assert "not one of the trained prompts" not in out


def test_cut_answers_are_noted(synth_dir, capsys):
    """A caption or answer longer than max_answer_tokens (a user's long captions) is trained cut,
    with eot after the cut: load_data says how many, rather than cutting them without a word."""
    tok = tokenizer.load_tokenizer(synth_dir, "corpus")
    fit = dict(max_frames=64, prefix_len=8, llm_block_size=48)
    pengi.load_data(synth_dir, pengi.PengiConfig(max_answer_tokens=2, **fit), tok)
    out = capsys.readouterr().out
    assert "answer(s) longer than max_answer_tokens=2 are cut to it" in out
    assert f"{synth_dir} train: " in out
    pengi.load_data(synth_dir, pengi.PengiConfig(max_frames=64, prefix_len=8, llm_block_size=256,
                                                 max_answer_tokens=200), tok)
    assert "longer than" not in capsys.readouterr().out


def test_a_task_with_one_answer_for_every_clip_is_noted(synth_dir, tmp_path, capsys):
    """A folder without labels gives every clip the class "sound" (with one label, every clip that
    label): the class task then teaches a constant, whatever the audio, and the run said only
    "class 26". load_data names the task and its one answer; tasks of varied answers stay quiet."""
    d = tmp_path / "d"
    shutil.copytree(synth_dir, d)
    clips = [json.loads(line) for line in open(d / "train_clips.jsonl")]
    for c in clips:
        c["labels"]["class"] = "sound"
    (d / "train_clips.jsonl").write_text("".join(json.dumps(c) + "\n" for c in clips))
    tok = tokenizer.load_tokenizer(str(d), "corpus")
    cfg = dict(max_frames=64, prefix_len=8, llm_block_size=256, max_answer_tokens=200)
    pengi.load_data(str(d), pengi.PengiConfig(tasks="caption,class", **cfg), tok)
    out = capsys.readouterr().out
    assert f"note: {d} train: every class example has the same answer 'sound'" in out
    assert "every caption example" not in out
    pengi.load_data(synth_dir, pengi.PengiConfig(tasks="caption,class", **cfg), tok)
    assert "the same answer" not in capsys.readouterr().out
