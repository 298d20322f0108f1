"""The backends behind one small interface (:class:`scoring.backends.base.Backend`): transformers + peft with its
prefix cache, vLLM, the naive loop and the null backend."""
