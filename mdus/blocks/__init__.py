"""Blocks inserted into a frozen decoder LLM."""

from mdus.blocks.cgmlp import ConvolutionalGatingMLP

__all__ = ["ConvolutionalGatingMLP"]
