"""ktsft: LoRA fine-tuning kernels for the CPU-resident routed experts of
Mixture-of-Experts LLMs (forward with activation cache, exact backward)."""
from . import reference
from ._dispatch import cpu_info
from .buffers import KExpertsSFTBuffer
from .wrapper import BaseSFTMoEWrapper, SFTMoEWrapper

__version__ = "0.1.0"



def __getattr__(name):
    # ktsft.torch imports torch: loaded on first use only
    if name == "torch":
        import importlib

        return importlib.import_module(".torch", __name__)
    raise AttributeError(f"module 'ktsft' has no attribute {name!r}")


__all__ = ["BaseSFTMoEWrapper", "KExpertsSFTBuffer", "SFTMoEWrapper", "cpu_info", "reference",
           "__version__"]
