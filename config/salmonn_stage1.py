# SALMONN stage 1, pre-training: transcription and captioning only. As in the paper only the
# Q-Former, its projection and LoRA train; the encoders (config/salmonn_whisper.py,
# config/salmonn_beats.py) and the LLM (config/salmonn_llm.py) are loaded (*_init) and frozen.
# Paper: AdamW betas (0.9, 0.999), weight decay 0.05, warmup then cosine, peak lr 3e-5 for a 13B
# LLM. Our Q-Former starts from random weights and the whole model is tiny, so the peak lr is ours:
# 1e-3 here, lower in later stages. Sizes are ours too (CPU scale).
# python train.py config/salmonn_stage1.py   ->  out/salmonn-stage1/ckpt.pt
model = "salmonn"
stage = "pretrain"
out_dir = "out/salmonn-stage1"
data_dir = "data/synth"
tokenizer = "corpus"   # as config/salmonn_llm.py (the checkpoint it starts from records it)
init_from = "scratch"
# the speech encoder's corpus (config/salmonn_whisper.py) joins the transcription task, as the paper's
# stages train on LibriSpeech's ASR (its other tasks and its val split stay out)
asr_data_dir = "data/synth_asr"
llm_init = "out/salmonn-llm/ckpt.pt"
whisper_init = "out/salmonn-whisper/ckpt.pt"
beats_init = "out/salmonn-beats/ckpt.pt"
# model (every stage uses the same sizes). Here the *_init files' sizes replace the speech_*,
# beats_* and llm_* values below (salmonn.set_pretrained_dims); stages 2-3 must equal them
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
connect_ctc_weight = 1.0  # ours: the audio tokens of transcribed clips, read as the LLM's tokens,
                          # trained toward their transcript by CTC (stage 1 only;
                          # docs/salmonn_experiments.md)
# optimiser
batch_size = 16
max_iters = 3600       # 600 until the frozen encoders ran once per clip, then 1800; with the CTC
                       # above, 3600 read the tokens better and gave better Morse, DTMF and
                       # classification for ~1 more minute (docs/salmonn_experiments.md)
warmup_iters = 100
learning_rate = 1e-3
min_lr = 1e-4
beta1 = 0.9
beta2 = 0.999
weight_decay = 0.05
eval_interval = 200
eval_iters = 10
log_interval = 25
