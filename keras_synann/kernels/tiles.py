"""How a fused GPU kernel (Triton, Pallas) tiles its work."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """The tiling of the fused kernels (benchmarks/fused_sweep.py times choices).

    Attributes:
        block_rows, block_cols: the output tile one program computes, in
            every kernel (forward: samples x outputs; input gradient:
            samples x inputs; weight gradient: inputs x outputs).
        chunk: factors multiplied per log in the forward (and the unroll of
            the gradients' loops); products are floored per chunk, as in the
            keras.ops path with this `chunk_size`.
        num_warps: warps per program on a GPU.
    """

    block_rows: int
    block_cols: int
    chunk: int
    num_warps: int

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(
                    f"`{field.name}` must be a positive integer. "
                    f"Received: {field.name}={value!r}"
                )
