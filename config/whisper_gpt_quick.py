# A short Whisper-GPT hybrid run for a CPU (12-30 s on 2 cores): the README's first command.
# python train.py config/whisper_gpt_quick.py && python sample.py --out_dir=out/whisper-gpt-quick --clip=3
model = "whisper_gpt"
out_dir = "out/whisper-gpt-quick"
data_dir = "data/synth"
use_mel = True
mel_lag = 1
block_size = 128
n_layer = 3
n_head = 4
n_embd = 128
mel_n_layer = 1
mel_n_head = 2
mel_n_embd = 64
mel_dim = 32
dropout = 0.0
batch_size = 12
max_iters = 300
warmup_iters = 30
learning_rate = 2e-3
min_lr = 2e-4
eval_interval = 100
eval_iters = 10
log_interval = 20
