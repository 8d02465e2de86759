# Whisper-GPT Table 1 at CPU size: Hybrid, CPU-sized: GPT-S CPU's decoder + a 2-block mel path (48
# wide) -> 32-d vector per step (0.46M parameters, +8% as the paper's 4M vs 3.7M). All sizes,
# context and budget are ours. The three CPU configs share data and budget: 900 iterations x 12
# windows x 128 frames (1.4M tokens). Run all three and compare (docs/whisper_gpt.md, "Table 1"):
# for m in s l hybrid; do python train.py config/whisper_gpt_${m}_cpu.py; done
# python eval.py out/whisper-gpt-{s,l,hybrid}-cpu
model = "whisper_gpt"
out_dir = "out/whisper-gpt-hybrid-cpu"
data_dir = "data/synth"
use_mel = True
mel_lag = 1
mel_n_layer = 2
mel_n_head = 2
mel_n_embd = 48
mel_dim = 32
block_size = 128
n_layer = 2
n_head = 4
n_embd = 96
dropout = 0.1
batch_size = 12
max_iters = 900
warmup_iters = 30
learning_rate = 2e-3
min_lr = 2e-4
eval_interval = 100
eval_iters = 10
log_interval = 20
