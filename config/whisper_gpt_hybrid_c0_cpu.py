# Whisper-GPT at CPU size: the hybrid of whisper_gpt_hybrid_cpu.py, trained on the mels it will see
# while generating: the log-mel of each clip's codebook 0 decoded alone (needs python prepare.py
# --codebook0_mel). Ours, not the paper's: the paper's hybrid (and Table 1) reads the mel of the
# real audio, which holds what the seven finer codebooks add; a generator has only its own codebook
# 0. Same size and budget as the other CPU configs.
model = "whisper_gpt"
out_dir = "out/whisper-gpt-hybrid-c0-cpu"
data_dir = "data/synth"
use_mel = True
mel_source = "codebook0"
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
