# SALMONN, stage "llm": text-only pretraining of the small GPT-2-layout LLM on the corpus text
# (captions, descriptions, transcripts, QA and the prompt template with its answers) and, in half of
# each batch's rows, generic copying conversations with the loss on the answers (word spans between
# the <Speech> tags repeated, reversed, de-duplicated; digits spelled out; and, in 30% of them, a
# train clip's question about its transcript, which is shown between the tags as audio tokens read:
# reading comprehension, as Vicuna brings it). Copying emerges late:
# the probe reads 0% at 600 iterations, 20% at 1000 and 67% at 1400 (lr 2e-3); at 2000, 76-96% over
# seeds and thread counts. 3000 iterations copy 98-100% but transcribe held-out speech worse after
# stage 2 (docs/salmonn_experiments.md).
# This LLM is the CPU-sized stand-in for Vicuna, whose ability to read its input SALMONN relies on;
# stage 1 loads it (llm_init), checks that it passes the copy probe, and freezes it.
# The LLM settings below must match config/salmonn_stage*.py. Sizes and optimiser are ours (not the
# paper's).
# python train.py config/salmonn_llm.py   ->  out/salmonn-llm/ckpt.pt
model = "salmonn"
stage = "llm"
out_dir = "out/salmonn-llm"
data_dir = "data/synth"
tokenizer = "corpus"   # the small BPE stored with the data: GPT-2's 50k-row head would dwarf this
                       # LLM; later stages keep it
llm_n_layer = 4
llm_n_head = 4
llm_n_embd = 128
llm_block_size = 160
llm_dropout = 0.0
reading_share = 0.3     # 0 until 2026-12-05: then QA 0.47 -> 0.61 and Morse WER 0.16 -> 0.10 after
                        # stage 3, three seeds (docs/salmonn_experiments.md)
batch_size = 16
max_iters = 2000
warmup_iters = 100
learning_rate = 2e-3
min_lr = 2e-4
beta1 = 0.9
beta2 = 0.99
weight_decay = 0.1
eval_interval = 500
eval_iters = 10
log_interval = 25
