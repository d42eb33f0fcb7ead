"""How MLX runs on this machine: what machine this is (`machine`: CPU, cores,
ISA, BLAS kernels, MLX backend), the BLAS it uses on Linux (`blas`), the
operations whose best form depends on the backend (`kernels`), and the execution
policy of a process (`policy`: precision, streams, allocator, evaluation order)."""
