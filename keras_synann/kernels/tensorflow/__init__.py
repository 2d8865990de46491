"""`log_inhibition` under tensorflow: the custom gradients every implementation
runs as (`gradients`), and the kernels

    cpu   the C loops as numpy functions (float32, CPU; eager calls and
          graphs that stay in this process)                       cpu.py
    ops   the keras.ops reference, its forward and adjoint compiled
          with XLA                                                reference.py

The registry (`kernels.REGISTRY`) says where each applies, and where the
plain chunked ops are traced instead (graphs no tape records, forward mode).
"""
