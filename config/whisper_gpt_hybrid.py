# Whisper-GPT hybrid (the paper's model): GPT-S's decoder fed [token embedding (224) | mel vector
# (32)] per step; the 64-bin mel frames pass through 2 lightweight causal decoder blocks (128 wide)
# to the 32-d vector. ~4.1M parameters (paper: 4M; secondary sources: 4.1M). Depth/width/context are
# ours.
# python train.py config/whisper_gpt_hybrid.py [--data_dir=data/<your prepared data>]
model = "whisper_gpt"
out_dir = "out/whisper-gpt-hybrid"
data_dir = "data/synth"
use_mel = True
mel_lag = 1  # step t sees mel frame t-1: frame t's window reaches into the next block (see
             # whisper_gpt.py)
block_size = 256
n_layer = 4
n_head = 4
n_embd = 256
mel_n_layer = 2
mel_n_head = 4
mel_n_embd = 128
mel_dim = 32
dropout = 0.1
batch_size = 64
max_iters = 10000
warmup_iters = 500
learning_rate = 1e-3
min_lr = 1e-4
weight_decay = 0.1
eval_interval = 500
eval_iters = 50
log_interval = 50
