#!/usr/bin/env bash
# The GPU numbers in docs/performance.md, in one run (jax and torch on one CUDA GPU):
# the layer at batch 4096, n = 1024 with every implementation, the fused
# kernels' tile sweep, the opt-in series, and MNIST seconds per epoch
# against Dense.
#
#   bash benchmarks/gpu.sh [OUTPUT_DIR]      (default benchmarks/results/gpu)
#
# Needs keras_synann importable (pip install -e ".[jax,torch]" or PYTHONPATH)
# and jax with CUDA, torch with CUDA and triton installed. Each part has its
# own time limit; a failing part is reported and the others still run.
set -uo pipefail
out=${1:-benchmarks/results/gpu}
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
failed=()

part() {  # part NAME SECONDS COMMAND...: run with a time limit, log to $out/NAME.txt
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt" || failed+=("$name")
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    KERAS_BACKEND=jax "$py" -c "import jax, torch, triton, keras; print('jax', jax.__version__, \
jax.devices()[0].device_kind, '| torch', torch.__version__, '| triton', \
triton.__version__, '| keras', keras.__version__)" 2>&1 | tail -1
} | tee "$out/env.txt"

# The keras.ops path is left out here: under jax it had not finished one
# measurement at this shape on an H100 when the run hit its time limit
# (benchmarks/results/gpu/README.md).
part layer 200 "$py" -m benchmarks.layer --backends torch,jax \
    --implementations triton,pallas,torch --batch 4096 --n 1024 \
    --memory-batch 4096 --no-reference --json "$out/layer.json"
part sweep_torch 50 env KERAS_BACKEND=torch "$py" -m benchmarks.fused_sweep
part sweep_jax 50 env KERAS_BACKEND=jax "$py" -m benchmarks.fused_sweep
# The opt-in Taylor series (not exact): its cost at the same shape.
for backend in torch jax; do
    part "series_$backend" 45 env KERAS_BACKEND=$backend "$py" -m benchmarks.series \
        --orders 2 3 4 --beta-max 0.1 --shapes 4096x1024 --repeats 10 \
        --output "$out/series_$backend.json"
done
part mnist 180 "$py" -m benchmarks.mnist --models lenet mlp --backends torch jax \
    --epochs 3 --dense-epochs 3 --output "$out/mnist.json"
part mnist_ops 90 "$py" -m benchmarks.mnist --models lenet mlp --backends jax \
    --implementation ops --epochs 3 --dense-epochs 0 --output "$out/mnist_ops.json"

if ((${#failed[@]})); then
    echo "failed or timed out: ${failed[*]}" >&2
    exit 1
fi
