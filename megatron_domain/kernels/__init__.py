"""Kernels: each op has a pure-torch reference and faster implementations (chunked torch,
Triton, the csrc C++/CUDA extension), all behind one contract and tested against the
reference. `registry.get_kernel(op, backend, device)` picks one; see registry.py for the table.
Nothing here imports triton or the compiled extension until that implementation is chosen."""
