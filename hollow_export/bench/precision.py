"""Frozen weights stored in fp16/bf16 and computed in fp32: the low-precision rows on a CPU.

In:  a net (LoRA trainable, the rest frozen) and a storage dtype.
Out: the same net, its frozen weights held in that dtype, each layer upcast while it runs and the
     tensors autograd saves packed back to the low-precision originals: exactly an fp32 step over
     rounded weights.
"""

from __future__ import annotations


def store_frozen_weights(net, dtype) -> None:
    """Hold `net`'s frozen weights in `dtype` (fp16/bf16) and compute in fp32, for devices without fast
    low-precision kernels (this CPU's bf16/fp16 conv is ~300x slower than fp32).

    A module's frozen tensors are upcast when it runs and put back after; the fp32 copies autograd
    saves for the backward are packed as their low-precision originals and upcast again when the
    backward unpacks them. Trainable (LoRA) parameters stay fp32. Held weight bytes: those of `dtype`,
    plus one layer's fp32 copy at a time.
    """
    import weakref

    from torch.autograd.graph import saved_tensors_hooks

    copies: dict[int, tuple] = {}  # id(fp32 copy) -> (weakref to it, low-precision original)

    def upcast(module, _inputs):
        for kind in ("_parameters", "_buffers"):
            for name, low in list(getattr(module, kind).items()):
                if low is not None and low.dtype == dtype and not low.requires_grad:
                    full = low.float()
                    copies[id(full)] = (weakref.ref(full), low)
                    module.__dict__.setdefault("_stored_low", {})[(kind, name)] = low
                    getattr(module, kind)[name] = full

    def restore(module, _inputs, _output):
        for (kind, name), low in module.__dict__.pop("_stored_low", {}).items():
            copies.pop(id(getattr(module, kind)[name]), None)
            getattr(module, kind)[name] = low

    def pack(t):
        base = t if t._base is None else t._base
        entry = copies.get(id(base))
        if entry is not None and entry[0]() is base:
            return ("low", entry[1], t.size(), t.stride(), t.storage_offset())
        return t

    def unpack(packed):
        if isinstance(packed, tuple) and packed[0] == "low":
            _, low, size, stride, offset = packed
            return low.float().as_strided(size, stride, offset)
        return packed

    for module in net.modules():
        frozen = [t for t in list(module._parameters.values()) if t is not None and not t.requires_grad]
        for t in frozen:
            t.data = t.data.to(dtype)
        if frozen:
            module.register_forward_pre_hook(upcast)
            module.register_forward_hook(restore)
    hooks = saved_tensors_hooks(pack, unpack)  # active from the start to the end of `net`'s forward

    def enter_hooks(_module, _inputs):
        hooks.__enter__()

    def exit_hooks(_module, _inputs, _output):
        hooks.__exit__(None, None, None)

    net.register_forward_pre_hook(enter_hooks)
    net.register_forward_hook(exit_hooks)
