# Pengi at CPU size on data/synth: every task (caption, metadata, class, QA, music) as text
# generation. The frozen LM is the small GPT-2-layout LLM pretrained on the corpus text by
# config/salmonn_llm.py (GPT-2 base is the paper's; it is not reachable offline). Sizes, prefix
# length and budget are ours.
# The audio encoder starts from the `clap` stage (config/pengi_clap.py), as the paper's HTSAT comes
# from CLAP; --init_from=scratch starts it from a random init instead.
# python train.py config/salmonn_llm.py
# python train.py config/pengi_clap.py
# python train.py config/pengi_synth.py
# python eval.py out/pengi-synth
model = "pengi"
stage = "pengi"
out_dir = "out/pengi-synth"
data_dir = "data/synth"
llm_init = "out/salmonn-llm/ckpt.pt"   # its sizes replace the llm_* fields; its tokenizer (recorded
                                       # in it) is used. With init_from, the LM's weights come from that
                                       # checkpoint (the clap stage loaded this same file): change both
                                       # together
tokenizer = "corpus"     # the small BPE stored with the data, as the LM above was trained with
tasks = "caption,metadata,class,qa,music"
task_weights = "chord=2"  # chords drawn twice as often (ours): 140 training chords over 45 names; chords
                          # 2.7x -> 4.7x chance, QA 0.38 -> 0.34 (docs/pengi_experiments.md)
init_from = "out/pengi-clap/ckpt.pt"   # the audio encoder and text tower of the clap stage (the tower
                                       # is frozen again here)
# audio encoder: 2 Swin stages over 4x4 patches of 192 mel frames (2.6 s) x 64 bins
max_frames = 192
patch_size = 4
enc_dim = 32
enc_depths = "2,2"
enc_heads = "2,4"
window = 8
d_embed = 64             # paper: 1024
text_n_layer = 2         # 2 layers, started from the LM's first 2 in the clap stage (taken from
                         # init_from here), frozen
text_init = "llm"
prefix_len = 8           # paper: 40 per modality
map_n_layer = 2          # ClipCap: 8
map_n_head = 4
dropout = 0.1
clap_weight = 1.0        # ours: the contrastive term also during Pengi's training, next to the
                         # clap stage's start (0 = the paper's objective only)
# optimiser (ours)
batch_size = 16
max_iters = 3000         # 1500 -> 3000: captions and QA up by twice their spread
                         # (docs/pengi_experiments.md)
warmup_iters = 100
learning_rate = 2e-3
min_lr = 2e-4
weight_decay = 0.05
eval_interval = 250
eval_iters = 10
log_interval = 25
