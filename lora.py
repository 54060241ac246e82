"""LoRA (Hu et al., 2021) by hand: fine-tune a low-rank update beside frozen linear layers,

    y = x @ W.T + b + (dropout(x) @ A.T @ B.T) * alpha / rank

with W and b frozen, A (rank x in) random and B (out x rank) zero: at step 0 the model is the
base model exactly, and only rank x (in + out) numbers per layer learn. Dividing by the rank
lessens the retuning of the learning rate when the rank changes. merge() then folds B @ A * alpha
/ rank into W. It imports only the standard library and torch: copy it into your project.

    model.requires_grad_(False)  # then unfreeze a new head: it and the adapters train
    lora.add(model, {"query", "value"}, rank=8, alpha=16, dropout=0.0)
    ...train, save and resume as usual, then: lora.merge(model)
"""

import math

import torch


class LoRALinear(torch.nn.Module):
    """A frozen nn.Linear (`base`) and its trainable low-rank update (lora_A, lora_B)."""

    def __init__(self, base, rank, alpha, dropout):
        super().__init__()
        self.base = base.requires_grad_(False)
        # A drawn as nn.Linear draws its own weights; B zero, so that B @ A is zero at first.
        self.lora_A = torch.nn.Parameter(base.weight.new_empty(rank, base.in_features))
        torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = torch.nn.Parameter(base.weight.new_zeros(base.out_features, rank))
        self.scaling = alpha / rank
        self.dropout = torch.nn.Dropout(dropout)

    def forward(self, x):
        # Two thin matmuls (x @ A.T is batch x r): B @ A, a full out x in matrix, is never formed.
        update = self.dropout(x) @ self.lora_A.T @ self.lora_B.T
        return self.base(x) + update * self.scaling


def add(model, names, rank, alpha, dropout):
    """Replace every nn.Linear of `model` named in `names` by a LoRALinear around it, its A drawn
    from torch's random state. Returns how many; none is an error: training would change nothing."""
    found = 0
    for parent in list(model.modules()):  # a snapshot: the new LoRALinears are not searched
        for name, child in list(parent.named_children()):
            if name in names and isinstance(child, torch.nn.Linear):
                setattr(parent, name, LoRALinear(child, rank, alpha, dropout))
                found += 1
    if not found:
        raise ValueError(f"LoRA: no nn.Linear named {sorted(names)} in {type(model).__name__}")
    return found


@torch.no_grad()
def merge(model):
    """Fold each LoRALinear back into its nn.Linear, W + B @ A * alpha / r: the same function
    (to rounding), under the base model's names, so its state_dict loads with no LoRA code."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                child.base.weight += (child.lora_B @ child.lora_A) * child.scaling
                setattr(parent, name, child.base)
    return model
