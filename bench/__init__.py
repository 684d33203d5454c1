"""Benchmark of ktsft's MoE-LoRA forward/backward against measured machine
ceilings and the PyTorch implementations people use today.

Run ``python -m bench --help``; docs/performance.md explains the columns."""
