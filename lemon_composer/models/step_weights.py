"""Fuse once per optimizer step: the fused weights of one step, shared by all of its micro-batches.

Fusing is linear in the source and the same for every micro-batch of a step, so

    Σ_k dL_k/dθ = Σ_k J^T g_k = J^T (Σ_k g_k),   J = dW/dθ (the fusion), g_k = dL_k/dW.

Micro-batches 1..n-1 run on detached leaves of the fused weights (the same storage, no copy),
one leaf per target weight, so each ``.grad`` accumulates g_1 + ... + g_{n-1} in place (leaves of
the per-kind stacks would cost a stack copy per micro-batch). The last micro-batch runs on the
graph-attached fused tensors; a hook on each adds the accumulated leaf gradient to g_n, so that micro-batch's
backward carries Σ_k g_k through the fusion graph into the operators exactly once. Because that
happens inside the last micro-batch's own backward, Composer's DDP gradient sync (which runs in
the last micro-batch), gradient clipping (after all micro-batches) and the optimizer step see
the operators' gradients exactly where they would without amortisation.
"""
from __future__ import annotations

from torch import Tensor


class StepWeights:
    """The fused stacks of one optimizer step, handed to ``num_microbatches`` forwards in turn.

    Args:
        fused: the fused weights by name (attached to the operators' graph); a tensor that appears
            under two names (tied embedding and head) gets one leaf.
        num_microbatches: how many training forwards this optimizer step runs.
    """

    def __init__(self, fused: dict[str, Tensor], num_microbatches: int) -> None:
        if num_microbatches < 1:
            raise ValueError(f"num_microbatches={num_microbatches}: expected at least 1")
        self.fused = fused
        by_id = {id(v): v.detach().requires_grad_(v.requires_grad) for v in fused.values()}
        self.leaves = {k: by_id[id(v)] for k, v in fused.items()}
        self.remaining = num_microbatches

    def next(self) -> dict[str, Tensor]:
        """The weights for the next micro-batch: leaves, then the graph-attached tensors for the last."""
        if self.remaining < 1:
            raise RuntimeError("lemon_fuse_once: more training forwards than the micro-batches announced "
                               "for this optimizer step")
        self.remaining -= 1
        if self.remaining:
            return self.leaves
        hooked = set()
        for name, w in self.fused.items():
            if w.requires_grad and id(w) not in hooked:
                hooked.add(id(w))
                # the leaf's buffer is ours alone: add g_n into it in place, no new |W| tensor
                w.register_hook(lambda g, leaf=self.leaves[name]: g if leaf.grad is None else leaf.grad.add_(g))
        return self.fused
