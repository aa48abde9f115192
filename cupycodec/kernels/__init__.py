"""CUDA kernels as source strings with lazy, cached compilation; one module per kernel family."""
