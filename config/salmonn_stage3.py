# SALMONN stage 3, activation tuning: a few steps on long story-like answers (the clips'
# "description"), which undoes the task over-fitting of stage 2 (the paper: answers grow long and
# free again). Paper: AdamW betas (0.9, 0.999), weight decay 0.05, warmup then cosine, peak lr 3e-5
# for a 13B LLM. Our Q-Former started from random weights in stage 1 (here it comes from
# init_from) and the whole model is tiny, so the peak lr is ours: 1e-4 here, few steps. Sizes are
# ours too (CPU scale).
# python train.py config/salmonn_stage3.py   ->  out/salmonn-stage3/ckpt.pt
model = "salmonn"
stage = "activation"
out_dir = "out/salmonn-stage3"
data_dir = "data/synth"
tokenizer = "corpus"   # as config/salmonn_llm.py (the checkpoint it starts from records it)
init_from = "out/salmonn-stage2/ckpt.pt"
# the speech encoder's corpus (config/salmonn_whisper.py) joins the transcription task, as the paper's
# stages train on LibriSpeech's ASR (its other tasks and its val split stay out)
asr_data_dir = "data/synth_asr"
tasks = "story,transcription"   # ours: half the examples replay stage 2's transcription. On stories
                                # alone the stage cost WER (DTMF +0.31, Morse +0.67 over 3 seeds);
                                # with the replay WER holds (+-0.01) and stories still grow 21 -> 34
                                # words (docs/salmonn_experiments.md)
# model (every stage uses the same sizes)
speech_n_layer = 4      # must match config/salmonn_whisper.py
speech_n_head = 4
speech_n_embd = 128
beats_n_layer = 2       # must match config/salmonn_beats.py
beats_n_head = 4
beats_n_embd = 128
beats_patch_f = 16
qformer_n_layer = 2
qformer_n_head = 4
qformer_n_embd = 128
window_frames = 12     # 0.32 s at 37.5 encoder frames/s (paper: 17 frames = 0.33 s at 50/s), with
window_queries = 2     # two queries each (paper: one): a word then spans a few audio tokens, as the
                       # LLM's copying documents show it, and each token sees a whole word's frames
                       # (6 frames and 1 query until 2026-12-05; docs/salmonn_experiments.md)
llm_n_layer = 4        # must match config/salmonn_llm.py
llm_n_head = 4
llm_n_embd = 128
llm_block_size = 160
lora_rank = 8          # paper: rank 8, alpha 32 (scale 4.0), dropout 0.1
lora_alpha = 32.0
lora_dropout = 0.1
dropout = 0.1          # the Q-Former's (the frozen encoders run without)
# optimiser
batch_size = 16
max_iters = 150
warmup_iters = 10
learning_rate = 1e-4
min_lr = 1e-5
beta1 = 0.9
beta2 = 0.999
weight_decay = 0.05
eval_interval = 50
eval_iters = 10
log_interval = 25
