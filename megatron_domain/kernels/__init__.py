"""Op table: each op maps implementation names to callables; `reference` is the pure-torch
definition every faster implementation (chunked, triton, cuda) is tested against."""

from megatron_domain.kernels.pack import pack_metadata_reference

OPS = {
    "pack_metadata": {"reference": pack_metadata_reference},
}


def get_op(name: str, impl: str = "reference"):
    """Look up an implementation; unknown names raise with the available choices."""
    if name not in OPS:
        raise KeyError(f"unknown op {name!r}; known ops: {', '.join(OPS)}")
    if impl not in OPS[name]:
        raise KeyError(f"op {name!r} has no {impl!r} implementation; available: {', '.join(OPS[name])}")
    return OPS[name][impl]
