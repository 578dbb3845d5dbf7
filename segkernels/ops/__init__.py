"""One package per op, named by its stem (the same stem as csrc/<op>/, tests/<op>/ and
benchmarks/bench_<op>.py). Each holds the public API in __init__.py, the plain-PyTorch
reference in reference.py, the fake kernels and autograd in registration.py and, where the GPU
kernel is Triton, the kernels and their launchers in triton.py."""
