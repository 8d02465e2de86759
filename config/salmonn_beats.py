# SALMONN's audio-event encoder, pretrained as the BEATs checkpoint SALMONN uses was fine-tuned:
# multi-label tagging, here of the clips' labels (class, instrument, event, pitch, chord, speaker,
# gender, ...). Stages 1-3 load the encoder (beats_init) and keep it frozen. Sizes and optimiser are
# ours (CPU scale).
# python train.py config/salmonn_beats.py   ->  out/salmonn-beats/ckpt.pt
model = "salmonn"
stage = "beats"
out_dir = "out/salmonn-beats"
data_dir = "data/synth"
tokenizer = "corpus"
beats_n_layer = 2
beats_n_head = 4
beats_n_embd = 128
beats_patch_f = 16
dropout = 0.1
batch_size = 16
max_iters = 600
warmup_iters = 50
learning_rate = 4e-3    # 1e-3 until 2026-12-05: at 600 iterations it told the speaker's sex at
min_lr = 4e-4           # chance (0.48; 0.85 at 4e-3, events 0.60 -> 0.84;
                        # docs/salmonn_experiments.md)
beta1 = 0.9
beta2 = 0.98
weight_decay = 0.05
eval_interval = 200
eval_iters = 10
log_interval = 50
