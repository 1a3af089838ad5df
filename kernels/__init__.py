"""CUDA sources of the fused optimizer kernels (read at run time by fusedopt.cuda)."""
