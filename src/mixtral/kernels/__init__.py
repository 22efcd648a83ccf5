"""How a model runs: the one seam between the math (model.py) and the code that executes it.

    runner = kernels.prepare(model)       # at load (loading.py): the fastest way this machine can run it
    runner = kernels.runner(model)        # later: the runner it was prepared with, else the torch reference
    step = runner.decode_step(cache, tokens, positions, rows)    # -> Step(logits, lse, best)

Runners (runner.py: the interface and the torch reference):
- native.py: our C kernels (csrc/cpu_kernels.c) run the whole pass, in one C call per decode step (prompts of
  bf16/int8/int4 weights: prompt.py's GEMMs, where the CPU multiplies bf16 or int8 in hardware); the weights
  stay as loaded (native_lib.py builds and checks the library, native_weights.py describes the weights to it);
  experts that do not fit in memory are read from disk into an expert cache by offload.py's store, which the
  C side asks for each layer's experts; a rank's part of a model split over processes (distributed.py) runs on
  it too, given a `native.Split`: op by op, each part summed over the ranks before it joins the residual stream;
- fbgemm.py: where ours cannot run, the CPU's weights are repacked for fbgemm (a module swap) and the model's own
  torch code runs them;
- torch: the model's own ops (`pack=False`, other devices, training).
A model prepared for the native runner holds it (`model.runner`), so `model(...)` runs on it too; moving or
casting the model returns it to torch. Callers step a runner and never branch on which one it is.
"""

from __future__ import annotations

import weakref

from . import fbgemm, native, native_lib, prompt
from .native_lib import release_threads
from .runner import Runner, Step

__all__ = ["Runner", "Step", "describe", "prepare", "release_threads", "runner", "will_run_native"]

_runners: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its torch or fbgemm runner


class FbgemmRunner(Runner):
    """The model's own torch code on weights repacked for fbgemm (fbgemm.pack_model)."""

    name = "fbgemm"


def prepare(model, store=None, exact: bool = False) -> Runner:
    """Set a model up, in place, for the fastest runner this machine has for it, and return that runner: our C
    kernels on the CPU where they run, else fbgemm's packed weights on the CPU, else the torch reference.
    `store`: an expert store (offload.py) holding the experts the model does not; only our C kernels run one.
    `exact`: prompts stay on our exact fp32 kernels rather than the bf16 and integer GEMMs (prompt.py).
    Inference only: a prepared model cannot be trained, re-quantized or saved."""
    if getattr(model, "runner", None) is not None or isinstance(_runners.get(model), FbgemmRunner):
        return runner(model)  # prepared already
    _runners.pop(model, None)  # a torch runner handed out before: prepare anew
    if model.device.type == "cpu":
        prepared = native.prepare(model, store, exact)
        if prepared is not None:
            model.runner = prepared
            return prepared
        if store is not None:
            return runner(model)  # the caller sees that it is not native
        if fbgemm.pack_model(model):
            _runners[model] = FbgemmRunner(model)
            return _runners[model]
    return runner(model)


def runner(model) -> Runner:
    """The runner `model` was prepared with, else the torch reference (made once per model)."""
    own = getattr(model, "runner", None)  # (a model-like module of the caller's own has none)
    if own is not None:
        return own
    found = _runners.get(model)
    if found is None:
        found = _runners[model] = Runner(model)
    return found


def will_run_native(device) -> bool:
    """Whether `prepare` will put a model on `device` on our C kernels (unless one of its weights has none):
    they read int4 codes as stored, so the loader keeps them in that layout."""
    return native_lib.will_run(device)


def describe() -> str:
    """Which kernels a CPU model runs on here, and why not ours if it cannot (for `mixtral info`)."""
    if native_lib.available():
        rows = "; bf16 decode rows and batched int8/int4 rows on AVX-512" if native_lib.avx512_rows() else ""
        return (f"ours (kernels/native.py: AVX2 kernels, compiled on first use{rows}); prompts: "
                + prompt.describe())
    return f"fbgemm (kernels/fbgemm.py), since ours cannot run: {native_lib.unavailable_reason()}"
