"""Generation for evaluation and (later) rollouts: the native sampler."""
