"""`log_inhibition` under torch: the autograd Functions every implementation
runs as (`functions`), and the kernels

    cpu      the C loops through ctypes (float32 CPU tensors)   cpu.py
    torch    eager torch with reused buffers                    eager.py
    triton   fused Triton kernels (float32 CUDA tensors)        triton.py

("ops" is `kernels.reference`'s kernel, and the only one torch's tracers
record: they see torch operations only). The registry (`kernels.REGISTRY`)
says where each applies.
"""
