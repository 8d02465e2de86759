# Whisper-GPT Table 1 at CPU size: GPT-L, CPU-sized: token-only, 5 layers x 256 (4.5M parameters,
# 10.4x GPT-S CPU, as the paper's 40M is ~11x its 3.7M). All sizes, context and budget are ours. The
# three CPU configs share data and budget: 900 iterations x 12 windows x 128 frames (1.4M tokens).
# Run all three and compare (docs/whisper_gpt.md, "Table 1"):
# for m in s l hybrid; do python train.py config/whisper_gpt_${m}_cpu.py; done
# python eval.py out/whisper-gpt-{s,l,hybrid}-cpu
model = "whisper_gpt"
out_dir = "out/whisper-gpt-l-cpu"
data_dir = "data/synth"
use_mel = False
block_size = 128
n_layer = 5
n_head = 4
n_embd = 256
dropout = 0.1
batch_size = 12
max_iters = 900
warmup_iters = 30
learning_rate = 1e-3
min_lr = 1e-4
eval_interval = 100
eval_iters = 10
log_interval = 20
