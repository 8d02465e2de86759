# Pengi's first stage at CPU size: CLAP-style contrastive pretraining of the audio encoder and the
# text tower on the corpus's (audio, caption or label) pairs, as the paper's HTSAT comes from CLAP.
# No LM runs; llm_init only starts the text tower (text_init = "llm"). Pengi then starts from it,
# keeps training the audio encoder and freezes the text tower:
# python train.py config/pengi_clap.py
# python train.py config/pengi_synth.py
# The model sizes must match config/pengi_synth.py. Budget and optimiser are ours.
model = "pengi"
stage = "clap"
out_dir = "out/pengi-clap"
data_dir = "data/synth"
llm_init = "out/salmonn-llm/ckpt.pt"
tokenizer = "corpus"
tasks = "caption,class,music"
max_frames = 192
patch_size = 4
enc_dim = 32
enc_depths = "2,2"
enc_heads = "2,4"
window = 8
d_embed = 64
text_n_layer = 2
text_init = "llm"
prefix_len = 8
map_n_layer = 2
map_n_head = 4
dropout = 0.1
batch_size = 32
max_iters = 500
warmup_iters = 50
learning_rate = 1e-3
min_lr = 1e-4
weight_decay = 0.05
eval_interval = 250
eval_iters = 10
log_interval = 25
