"""Shared learnable pieces and loss building blocks: projectors, cross-model attention, divergences, token weights."""
