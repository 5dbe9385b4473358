"""The language model's side: the engine (prefill with spliced embeddings, batched decode), its KV
slabs and hand-off entries, prompts, sampling and continuous batching."""
