"""`log_inhibition` under jax: the four primitives every implementation runs
as (`primitives`, lowered to the keras.ops reference wherever a module is
exported, with a jax2onnx plugin each: `onnx`), and the kernels

    cpu      the C loops as XLA FFI calls (float32, one CPU)   cpu.py
    pallas   fused Pallas kernels (float32, a GPU)              pallas.py

("ops" is `kernels.reference`'s kernel); `conv` is a convolution for the
models on a CPU. The registry (`kernels.REGISTRY`) says where each applies.
"""
