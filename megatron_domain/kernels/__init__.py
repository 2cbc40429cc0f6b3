"""Kernels: every op has its pure-torch reference here (`pack.py`: packing metadata); faster
implementations (chunked, Triton, CUDA) and the per-op backend switch join it later, each
tested against the reference."""
