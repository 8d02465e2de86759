# Pengi at the paper's sizes, for a GPU: GPT-2 base (12 x 768, frozen), k = 40 prefix vectors per
# modality (80 prefix positions), 1024-d shared embedding, beam 5 at evaluation (python eval.py
# out/pengi-paper --beam=5). The LM is Hugging Face's GPT-2 base: llm_init is a GPT-2 directory
# (config.json + model.safetensors or pytorch_model.bin), here ./gpt2 as `transformers` saves it
# (GPT2LMHeadModel.from_pretrained("gpt2").save_pretrained("gpt2")). The tokenizer is GPT-2's BPE
# (tokenizer = "gpt2": tiktoken's, or offline the copy openai-whisper ships), the vocabulary that LM
# was trained with; the same prepared data serves the CPU configs' corpus BPE. The HTSAT sizes
# follow HTSAT-tiny (96 wide, depths 2,2,6,2, window 8, patch 4) over 768 mel frames (10.2 s at 75
# frames/s). The text encoder is GPT-2's own first 12 layers (CLIP's text tower in the paper); as in
# the official code its text projection and the projection after it train. The mappers have 4 layers
# each (the official config's 8 layers split over the two). The optimiser settings and clap_weight
# are ours.
model = "pengi"
out_dir = "out/pengi-paper"
data_dir = "data/synth"
llm_init = "gpt2"
tokenizer = "gpt2"
tasks = "caption,metadata,class,qa,music"
max_frames = 768
patch_size = 4
enc_dim = 96
enc_depths = "2,2,6,2"
enc_heads = "4,8,16,32"
window = 8
d_embed = 1024
text_n_layer = 12
text_init = "llm"
prefix_len = 40
map_n_layer = 4          # per mapper: 8 in all, as the official config
map_n_head = 8
dropout = 0.1
clap_weight = 1.0        # ours: the paper's HTSAT came CLAP-pretrained; ours starts from scratch (0
                         # = paper objective only)
max_answer_tokens = 64
batch_size = 64
max_iters = 20000
warmup_iters = 1000
learning_rate = 1e-4
min_lr = 1e-5
weight_decay = 0.05
beta2 = 0.99
eval_interval = 1000
eval_iters = 20
log_interval = 50
device = "cuda"
dtype = "bfloat16"
