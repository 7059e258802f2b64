"""Blocks inserted into a frozen decoder LLM."""

from mdus.blocks.cgmlp import ConvolutionalGatingMLP
from mdus.blocks.ebranchformer import EBranchformerBlock

__all__ = ["ConvolutionalGatingMLP", "EBranchformerBlock"]
