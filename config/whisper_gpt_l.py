# Whisper-GPT paper's GPT-L baseline: token-only GPT, ~40M parameters (10x GPT-S). For one GPU.
# 8 layers x 640 wide (10 heads of 64), 256 frames of context: our choices. Same budget as GPT-S.
# python train.py config/whisper_gpt_l.py [--data_dir=data/<your prepared data>]
model = "whisper_gpt"
out_dir = "out/whisper-gpt-l"
data_dir = "data/synth"
use_mel = False
block_size = 256
n_layer = 8
n_head = 10
n_embd = 640
dropout = 0.1
batch_size = 64
max_iters = 10000
warmup_iters = 500
learning_rate = 6e-4  # lower than the small models, as wider GPTs are usually trained (nanoGPT's
                      # GPT-2 124M: 6e-4); not tuned here
min_lr = 6e-5
weight_decay = 0.1
eval_interval = 500
eval_iters = 50
log_interval = 50
