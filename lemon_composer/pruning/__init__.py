"""Sheared-LLaMA targeted structured pruning with grouped-query attention (``model.name: lemon_prune``).

hard_concrete: L0 gates (Louizos et al. 2018); masks: the gate set and expected sizes;
masked_forward: gates as hooks on transformers' Llama; lagrangian: the size constraint;
model: the ComposerModel; slice: fold the masks and slice to a strict target ``LlamaForCausalLM``.
"""
