"""ktsft: LoRA fine-tuning kernels for the CPU-resident routed experts of
Mixture-of-Experts LLMs (forward with activation cache, exact backward)."""
from . import reference
from ._dispatch import cpu_info
from .buffers import KExpertsSFTBuffer
from .wrapper import BaseSFTMoEWrapper, SFTMoEWrapper

__version__ = "0.1.0"

__all__ = ["BaseSFTMoEWrapper", "KExpertsSFTBuffer", "SFTMoEWrapper", "cpu_info", "reference",
           "__version__"]
