"""The framework-neutral core: the tangent twin, the probe and its measures, the schedule, the outputs.

Nothing in here imports Lightning or Hugging Face: the adapters (``lightning_lazy.callback``,
``lightning_lazy.huggingface``) translate their framework's events into calls on it.
"""
