# Whisper-GPT paper's GPT-S baseline: token-only GPT on coarse EnCodec tokens, ~3.7M parameters.
# For one GPU. The paper gives no depth/width/context: 4 layers x 256 wide, 256 frames (3.4 s) are
# ours.
# python train.py config/whisper_gpt_s.py [--data_dir=data/<your prepared data>]
model = "whisper_gpt"
out_dir = "out/whisper-gpt-s"
data_dir = "data/synth"
use_mel = False
block_size = 256
n_layer = 4
n_head = 4
n_embd = 256
dropout = 0.1
# the same budget for S, L and Hybrid: 10k iterations x 64 windows x 256 frames = 164M tokens
batch_size = 64
max_iters = 10000
warmup_iters = 500
learning_rate = 1e-3
min_lr = 1e-4
weight_decay = 0.1
eval_interval = 500
eval_iters = 50
log_interval = 50
