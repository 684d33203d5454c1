"""Integrations of ktsft with training frameworks.

``ktsft.integrations.transformers``: swap the routed experts of a Hugging Face
transformers MoE model (Qwen3-MoE, Qwen2-MoE, OLMoE, Mixtral, DeepSeek-V3, ...)
for ``ktsft.torch.LoRAExperts`` (optional extra ``ktsft[hf]``).

Submodules are imported on use only: ``import ktsft.integrations`` needs
neither torch nor transformers.
"""
