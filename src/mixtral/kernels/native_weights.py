"""A whole model as the C side reads it: each block and the model as the structs of cpu_kernels.c (from
native_lib.NativeWeight), and the move of every weight into one buffer on 2 MiB pages."""

from __future__ import annotations

import ctypes
import sys

import torch
from torch import nn

from ..memory import release_free_memory
from ..model import MoE
from ..quantize import QuantLinear
from .native_lib import FORMATS, Layer, NativeWeight, Weight, available, library


def supports(model) -> bool:
    """Whether every weight of `model` has a native kernel (on the CPU, float or quantize.py int8/int4)."""
    if model.device.type != "cpu" or not available():
        return False
    for module in model.modules():
        for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if isinstance(module, QuantLinear):
                continue
            if tensor.is_floating_point() and tensor.dtype not in FORMATS:
                return False
    return True


class StoredExperts:
    """One of a layer's expert weights held by an expert store (offload.py): read through its slot tables."""

    def __init__(self, struct: Weight):
        self.struct, self.ref = struct, ctypes.pointer(struct)
        self.n, self.k = struct.n, struct.k


class NativeLayer:
    """A decoder block's weights for the C side: one by one (prefill) and as one Layer struct (decode).
    `store`: the expert store that holds this block's experts, if one does."""

    def __init__(self, block, index, args, store=None):
        attn, ffn = block.attn, block.ffn
        self.q, self.k, self.v, self.o = (NativeWeight(w) for w in (attn.wq, attn.wk, attn.wv, attn.wo))
        self.moe = isinstance(ffn, MoE)
        self.router = NativeWeight(ffn.router) if self.moe else None
        # the experts w1, w3, w2 hold: [first, first + held) of the router's (a rank's share when they are split
        # over processes, distributed.py's ExpertParallelMoE; else all of them)
        self.first = getattr(ffn, "start", 0)
        self.held = getattr(ffn, "stop", self.router.n if self.moe else 0) - self.first
        self.index = index
        self.stored = store is not None and self.moe and self.index in store.layers
        if self.stored:
            self.w1, self.w3, self.w2 = (StoredExperts(store.weight(self.index, name)) for name in ("w1", "w3", "w2"))
        else:
            self.w1, self.w3, self.w2 = (NativeWeight(w) for w in (ffn.w1, ffn.w3, ffn.w2))
        self.store_hook = None  # the layer's store_t (set by NativeModel)
        self.attn_norm, self.ffn_norm = block.attn_norm.weight, block.ffn_norm.weight  # fp32 by now
        self.struct = Layer(self.q.struct, self.k.struct, self.v.struct, self.o.struct,
                            self.router.struct if self.moe else Weight(), self.w1.struct, self.w3.struct,
                            self.w2.struct, self.attn_norm.data_ptr(), self.ffn_norm.data_ptr(),
                            block.attn_norm.eps, args.rope_theta, args.n_heads, args.n_kv_heads, args.head_dim,
                            args.sliding_window or 0, args.top_k if self.moe else 0)


class NativeModel:
    """What the forward pass needs from a model, described once for the C side; `store`: an expert store that
    holds the experts of some of its layers (offload.py), each told the next such layer's router for guesses."""

    def __init__(self, model, store=None):
        self.store = store
        self.layers = [NativeLayer(block, i, model.args, store) for i, block in enumerate(model.layers)]
        stored = [layer for layer in self.layers if layer.stored]
        for layer, after in zip(stored, stored[1:] + [None]):
            layer.store_hook = store.hook(layer.index, after.router.struct if after else None, model.args.top_k)
            layer.struct.store = ctypes.addressof(layer.store_hook)
        self.structs = (Layer * len(self.layers))(*(layer.struct for layer in self.layers))  # for mx_decode
        self.embed = NativeWeight(model.embed.weight)
        self.lm_head = NativeWeight(model.lm_head)
        self.n_experts = next((layer.router.n for layer in self.layers if layer.moe), 0)  # 0: no MoE layer


HUGE_PAGE = 2 << 20


def move_to_huge_pages(model) -> int:
    """Move every weight into one buffer backed by 2 MiB pages (cpu_kernels.c: mx_hugepages), as views of it;
    returns the bytes moved (0 where transparent huge pages are off: nothing changes). One buffer, unlike advising
    each tensor, also covers the small attention weights and the ends of the large ones. A tensor that nothing
    but the model holds gives its pages back as they are copied (mx_move), so the move never holds two copies
    of one; any other is copied whole and freed after."""
    slots: dict[int, list] = {}  # id(tensor) -> the (table, name) places that hold it (a tied head: two)
    tensors: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if (tensor is not None and tensor.numel() and tensor.device.type == "cpu" and tensor.is_contiguous()
                        and tensor.storage_offset() == 0
                        and tensor.untyped_storage().nbytes() == tensor.nbytes):
                    tensors.setdefault(id(tensor), tensor)
                    slots.setdefault(id(tensor), []).append((table, name))
    sizes = {key: -(-tensor.nbytes // 4096) * 4096 for key, tensor in tensors.items()}
    total = sum(sizes.values())
    if total < HUGE_PAGE:
        return 0
    whole_pages = -(-total // HUGE_PAGE) * HUGE_PAGE
    arena = torch.empty(whole_pages + HUGE_PAGE, dtype=torch.uint8)  # not written yet: no memory used
    start = -arena.data_ptr() % HUGE_PAGE
    if library().mx_hugepages(arena.data_ptr() + start, whole_pages, 0) == 0:
        return 0
    offset = start
    with torch.no_grad():
        for key in list(tensors):
            old, places = tensors.pop(key), slots.pop(key)
            new = arena[offset:offset + old.nbytes].view(old.dtype).view(old.shape)
            # held only by `old`, getrefcount's argument and the model's slots; its storage only by `old` and the
            # temporary storage object asked about
            owned = (sys.getrefcount(old) == 2 + len(places)
                     and torch._C._storage_Use_Count(old.untyped_storage()._cdata) == 2)
            library().mx_move(new.data_ptr(), old.data_ptr(), old.nbytes, int(owned))
            if isinstance(old, nn.Parameter):
                new = nn.Parameter(new, requires_grad=old.requires_grad)
            for table, name in places:
                table[name] = new
            offset += sizes[key]
            del old, new
            release_free_memory()
    return total
