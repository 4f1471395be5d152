"""Generated-data regimes of the one loop (docs/onpolicy.md): on-policy KD (GKD's λ, DistiLLM's adaptive
off-policy replay) and self-distillation with privileged context. Each changes what the loop feeds
``train.train_step`` — the micro-batches and, through ``teacher_input_ids``, what the teacher reads — never the
loss path."""
