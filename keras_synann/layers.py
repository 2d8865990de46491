"""The `Synapse` layer: a fully connected synapse graph (SynaNN)."""

from __future__ import annotations

import keras
from keras import constraints, initializers, ops, regularizers

from keras_synann import ops as synann_ops

#: Largest beta kept by the default constraint: beta stays in [0, 1).
BETA_MAX = 1.0 - 1e-6


@keras.saving.register_keras_serializable(package="keras_synann")
class ValueRange(keras.constraints.Constraint):
    """Clips weights into `[min_value, max_value]` (default: beta in [0, 1))."""

    def __init__(self, min_value: float = 0.0, max_value: float = BETA_MAX):
        if not min_value <= max_value:
            raise ValueError(
                "`min_value` must not exceed `max_value`. "
                f"Received: min_value={min_value}, max_value={max_value}"
            )
        self.min_value = float(min_value)
        self.max_value = float(max_value)

    def __call__(self, w):
        return ops.clip(w, self.min_value, self.max_value)

    def get_config(self):
        return {"min_value": self.min_value, "max_value": self.max_value}

    def __repr__(self):
        return f"ValueRange(min_value={self.min_value}, max_value={self.max_value})"


@keras.saving.register_keras_serializable(package="keras_synann")
class SynapseUniform(keras.initializers.RandomUniform):
    """The default kernel initializer of `Synapse`: beta uniform in [0, 0.01).

    The reference's intent; any Keras initializer can replace it. By its
    registered name, `"keras_synann>SynapseUniform"`, every layer gets its own
    instance, hence its own seed.
    """

    def __init__(self, minval: float = 0.0, maxval: float = 0.01, seed=None):
        super().__init__(minval=minval, maxval=maxval, seed=seed)


#: The default kernel constraint of `Synapse`: beta in [0, 1 - 1e-6].
BETA_RANGE = ValueRange(0.0, BETA_MAX)
#: The default alpha constraint of `Synapse`: alpha in [1e-6, 1e6], so > 0.
ALPHA_RANGE = ValueRange(1e-6, 1e6)


@keras.saving.register_keras_serializable(package="keras_synann")
class Synapse(keras.layers.Layer):
    """Fully connected synapse graph (Li, "A Synaptic Neural Network", 2019).

    For each sample, over the last axis (input size equals output size n):

        y_i = alpha_i * x_i * prod_j (1 - beta_ij * x_j),   beta_ij = kernel[j, i]

    i.e. `log y_i = log alpha_i + log x_i + sum_j log(1 - beta_ij * x_j)`.
    Each sample is computed on its own (the reference code mixes the samples
    of a batch; this layer does not).

    Domain: inputs are probabilities, x in (0, 1), and beta in [0, 1). The
    layer clips inputs to [0, 1] (gradient 0 outside), floors every factor
    `1 - beta_ij * x_j` at 1e-6 (gradient 0 below) and, by default, clips the
    kernel to [0, 1 - 1e-6] after each update. So every finite input gives a
    finite output and finite gradients. A mask on the input passes through.

    Args:
        units: optional positive int, the layer's size, which must equal the
            input's last dimension; `None` takes it from the input.
            `output_dim` (the reference layer's keyword) is an alias.
        kernel_initializer: initializer for the (n, n) kernel. The default,
            `SynapseUniform`, draws beta uniformly in [0, 0.01), as the
            reference intended.
        kernel_regularizer: optional regularizer for the kernel.
        kernel_constraint: constraint for the kernel; the default,
            `ValueRange(0, 1 - 1e-6)`, keeps beta in [0, 1). `None` leaves the
            kernel unconstrained.
        use_alpha: bool, learn a per-output excitation scale alpha_i. Default
            False, like the reference code (alpha = 1).
        alpha_initializer: initializer for alpha when `use_alpha`.
        alpha_constraint: constraint for alpha when `use_alpha`; the default,
            `ValueRange(1e-6, 1e6)`, keeps alpha > 0.
        zero_diagonal: bool, fix beta_ii = 0 (no self-inhibition, as the paper
            allows). The diagonal of the kernel is then ignored.
        chunk_size: positive int, input units processed at once (a memory and
            speed trade-off of the "ops" and "torch" implementations).
        implementation: how the log inhibition is computed: "auto"
            (default), "ops", "cpu", "torch", "triton" or "pallas"; all give
            the same values and gradients (to float32 rounding). "auto"
            takes the fastest that applies, and the portable keras.ops path
            ("ops") wherever a model is traced or exported:
            - torch: "triton" (float32 CUDA tensors), else "cpu" (fused C
              loops: float32 CPU tensors and a C compiler), else "torch";
              "ops" under torch.jit.trace, torch.compile, torch.export and
              torch.onnx.
            - jax: "pallas" (float32 on a single GPU), else "cpu" (float32
              on a single CPU device, a C compiler), else "ops". The fused
              kernels lower to the keras.ops computation when exported
              (`jax.export`, jax2tf, `model.export`).
            - tensorflow: "cpu" (float32, CPU only, a C compiler) in eager
              calls, training steps (graphs a gradient tape records) and
              Keras's predict and evaluate steps; "ops" in every other
              graph: `jit_compile=True`, `model.export` (SavedModel, ONNX),
              graphs that converters read.
            Without a C compiler "auto" warns once and runs several times
            slower on a CPU. An explicit choice that does not apply raises
            ValueError with the reason; see `keras_synann.ops.log_inhibition`.
        series_order: `None` for the exact layer, or a positive int K to
            approximate `sum_j log(1 - beta_ij x_j)` by its Taylor series to
            order K, computed as matmuls (about K Dense layers' cost; see
            `keras_synann.ops.log_inhibition_series` for the error bound).
            An opt-in for speed where beta * x stays well below 1; it does
            not combine with `implementation` (leave that "auto").
        **kwargs: base layer keywords (`name`, `dtype`, `trainable`, ...).

    Call arguments:
        inputs: a float tensor of probabilities, clipped to [0, 1].

    Input shape:
        N-D tensor with shape `(batch_size, ..., n)`, N >= 2.

    Output shape:
        The input's shape, `(batch_size, ..., n)`, in the compute dtype;
        under mixed precision the log-sum accumulates in float32.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> from keras_synann import Synapse
    >>> model = keras.Sequential(
    ...     [
    ...         keras.Input((20,)),
    ...         keras.layers.Dense(8, activation="sigmoid"),  # probabilities
    ...         Synapse(),
    ...         keras.layers.Dense(3),
    ...     ]
    ... )
    >>> loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    >>> model.compile("adam", loss)
    >>> x = np.random.uniform(size=(32, 20)).astype("float32")
    >>> labels = np.arange(32) % 3
    >>> history = model.fit(x, labels, epochs=2, verbose=0)
    >>> model.predict(x, verbose=0).shape
    (32, 3)
    >>> beta = keras.ops.convert_to_numpy(model.layers[1].beta)  # in [0, 1)
    >>> beta.shape
    (8, 8)
    """

    def __init__(
        self,
        units: int | None = None,
        kernel_initializer="keras_synann>SynapseUniform",
        kernel_regularizer=None,
        kernel_constraint=BETA_RANGE,
        use_alpha: bool = False,
        alpha_initializer="ones",
        alpha_constraint=ALPHA_RANGE,
        zero_diagonal: bool = False,
        chunk_size: int = synann_ops.DEFAULT_CHUNK_SIZE,
        implementation: str = "auto",
        series_order: int | None = None,
        **kwargs,
    ):
        # PyTorch-style arguments (the reference's `Synapse(64, 64)`,
        # `in_features`, `out_features`, `bias`): refused with the mapping.
        torch_style = {k: kwargs.pop(k) for k in ("in_features", "out_features", "bias") if k in kwargs}  # fmt: skip
        if isinstance(kernel_initializer, int) and not isinstance(
            kernel_initializer, bool
        ):
            torch_style = {"in_features": units, "out_features": kernel_initializer}  # fmt: skip
        if torch_style:
            sizes = {torch_style.get("in_features"), torch_style.get("out_features")}
            sizes = sorted(sizes - {None}) or ([units] if units else [])
            hint = "a Dense layer to resize" if len(sizes) > 1 else "Synapse()"
            hint = f"Synapse({sizes[0]})" if len(sizes) == 1 else hint
            raise ValueError(
                "`Synapse` takes one size, `units` (in_features = out_features), "
                "and has no bias, unlike the reference PyTorch module: use "
                f"{hint}. Received: "
                + ", ".join(f"{k}={v}" for k, v in torch_style.items())
            )
        output_dim = kwargs.pop("output_dim", None)
        if output_dim is not None:
            if units is not None and units != output_dim:
                raise ValueError(
                    "`units` and its alias `output_dim` disagree. "
                    f"Received: units={units}, output_dim={output_dim}"
                )
            units = output_dim
        # The layer does its own casting so that the sum accumulates in float32.
        kwargs.setdefault("autocast", False)
        super().__init__(**kwargs)
        if units is not None and (not isinstance(units, int) or units <= 0):
            raise ValueError(
                f"`units` must be a positive integer or None. Received: units={units}"
            )
        synann_ops.check_log_inhibition_args(chunk_size, implementation)
        synann_ops.check_series_order(series_order, "series_order", allow_none=True)
        if series_order is not None and implementation != "auto":
            raise ValueError(
                "`implementation` selects a kernel for the exact layer and "
                "does not apply with `series_order`; leave it 'auto'. "
                f"Received: implementation={implementation!r}, "
                f"series_order={series_order}"
            )
        self.units = units
        self.kernel_initializer = initializers.get(kernel_initializer)
        self.kernel_regularizer = regularizers.get(kernel_regularizer)
        self.kernel_constraint = constraints.get(kernel_constraint)
        self.use_alpha = bool(use_alpha)
        self.alpha_initializer = initializers.get(alpha_initializer)
        self.alpha_constraint = constraints.get(alpha_constraint)
        self.zero_diagonal = bool(zero_diagonal)
        self.chunk_size = chunk_size
        self.implementation = implementation
        self.series_order = series_order
        self.input_spec = keras.layers.InputSpec(min_ndim=2)
        self.supports_masking = True

    def build(self, input_shape):
        n = input_shape[-1]
        if n is None:
            raise ValueError(
                "The last dimension of the input to `Synapse` must be known. "
                f"Received: input_shape={tuple(input_shape)}"
            )
        if self.units is not None and self.units != n:
            raise ValueError(
                "`Synapse` maps n inputs to n outputs, so `units` must equal the "
                f"input's last dimension. Received: units={self.units}, "
                f"input last dimension={n}"
            )
        self.kernel = self.add_weight(
            name="kernel",
            shape=(n, n),
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
            constraint=self.kernel_constraint,
        )
        self.alpha = None
        if self.use_alpha:
            self.alpha = self.add_weight(
                name="alpha",
                shape=(n,),
                initializer=self.alpha_initializer,
                constraint=self.alpha_constraint,
            )
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: n})

    @property
    def beta(self):
        """The effective beta matrix, `beta[i, j] = kernel[j, i]` (zero diagonal applied)."""
        return ops.transpose(self._effective_kernel())

    def _effective_kernel(self):
        kernel = ops.convert_to_tensor(self.kernel)
        if self.zero_diagonal:
            kernel = kernel * (1.0 - ops.eye(kernel.shape[0], dtype=kernel.dtype))
        return kernel

    def call(self, inputs):
        alpha = None if self.alpha is None else ops.convert_to_tensor(self.alpha)
        y = synann_ops.synapse_graph(
            inputs,
            self._effective_kernel(),
            alpha=alpha,
            chunk_size=self.chunk_size,
            implementation=self.implementation,
            series_order=self.series_order,
        )
        return ops.cast(y, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        base_config = super().get_config()
        base_config.pop("autocast", None)
        config = {
            "units": self.units,
            "kernel_initializer": initializers.serialize(self.kernel_initializer),
            "kernel_regularizer": regularizers.serialize(self.kernel_regularizer),
            "kernel_constraint": constraints.serialize(self.kernel_constraint),
            "use_alpha": self.use_alpha,
            "alpha_initializer": initializers.serialize(self.alpha_initializer),
            "alpha_constraint": constraints.serialize(self.alpha_constraint),
            "zero_diagonal": self.zero_diagonal,
            "chunk_size": self.chunk_size,
            "implementation": self.implementation,
            "series_order": self.series_order,
        }
        return {**base_config, **config}
