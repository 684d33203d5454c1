"""Where the kernels write the LoRA gradients of a backward: straight into
the parameters' ``.grad`` (persistent buffers, no per-step allocation)
whenever autograd would only have stored or added them there.

A gradient returned from ``autograd.Function.backward`` is a fresh tensor
that AccumulateGrad keeps (``.grad`` was None) or adds to ``.grad`` and
frees: a page-faulted allocation of every LoRA matrix per step, and one
more pass over it per micro-batch.  Here, when it is safe, the kernels
write into the parameter's own buffer instead:

- ``.grad`` is None (after ``zero_grad()``): the kernels overwrite a
  buffer kept from the previous step, which becomes ``.grad``; kept only
  while nothing else holds it (a tensor the user saved is never reused);
- ``.grad`` is a contiguous float32 CPU tensor of the parameter's shape:
  the kernels add to it in place (gradient accumulation), each gradient
  summed first, so the result is bitwise the sum autograd would form.

It is safe when autograd's own AccumulateGrad would run for the parameter
in this backward (``loss.backward()``, not ``torch.autograd.grad`` or
``backward(inputs=...)`` without it) and no tensor hook or post-accumulate
hook is registered on it; otherwise the gradient goes back through autograd
as before.  The function then returns None for that parameter.
"""
from __future__ import annotations

import sys

import torch

_WILL_RUN = getattr(torch._C, "_will_engine_execute_node", None)


def _accumulator(module, name, p):
    """p's AccumulateGrad node, kept so the node stays the same object."""
    nodes = module.__dict__.setdefault("_ktsft_acc_nodes", {})
    got = nodes.get(name)
    if got is not None and got[0] is p:
        return got[1]
    with torch.enable_grad():
        node = p.view_as(p).grad_fn.next_functions[0][0]
    nodes[name] = (p, node)
    return node


def _in_place_ok(module, name, p) -> bool:
    if _WILL_RUN is None or not p.requires_grad:
        return False
    if p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None):
        return False
    try:
        return bool(_WILL_RUN(_accumulator(module, name, p)))
    except RuntimeError:  # not inside a backward the engine runs
        return False


def _free_buffer(module, name, shape):
    """The persistent buffer of `name`, or a new one where it is missing or
    still held elsewhere (a .grad the user kept across zero_grad)."""
    bufs = module.__dict__.setdefault("_ktsft_grad_bufs", {})
    b = bufs.get(name)
    # references: the dict, getrefcount's argument, and `b`
    if b is None or tuple(b.shape) != tuple(shape) or sys.getrefcount(b) > 3:
        b = torch.empty(shape, dtype=torch.float32)
        bufs[name] = b
    return b


def plan(module, names, params, shapes, need):
    """(outs, accumulate, install, returned): the arrays the kernels write,
    whether they add to them, {param index: buffer to set as .grad after},
    and {param index: tensor to hand back to autograd}."""
    modes = []
    for i, (n, p) in enumerate(zip(names, params)):
        if not need[i]:
            modes.append("skip")
        elif not _in_place_ok(module, n, p):
            modes.append("autograd")
        elif p.grad is None:
            modes.append("fresh")
        elif (p.grad.dtype == torch.float32 and p.grad.device.type == "cpu"
              and p.grad.shape == p.shape and p.grad.is_contiguous()
              and not p.grad.requires_grad):
            modes.append("add")
        else:
            modes.append("autograd")
    accumulate = "add" in modes
    outs, install, returned = {}, {}, {}
    for i, (n, p, m) in enumerate(zip(names, params, modes)):
        shape = shapes[i]
        if m == "add":
            outs[n] = p.grad
        elif m == "fresh":
            b = _free_buffer(module, n, shape)
            if accumulate:
                b.zero_()  # a mixed call adds everywhere: start this one from zero
            outs[n] = b
            install[i] = b
        else:  # autograd or skip: a fresh tensor, as before
            t = (torch.zeros if accumulate else torch.empty)(shape, dtype=torch.float32)
            outs[n] = t
            if m == "autograd":
                returned[i] = t
    return outs, accumulate, install, returned
