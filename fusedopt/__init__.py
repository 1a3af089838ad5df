"""fusedopt: GPU-fused optimizer kernels over flat parameter buffers, Keras 3 semantics.

    flat = fusedopt.FlatBuffer.from_arrays([w1, b1, w2, b2])
    grads = flat.zeros_like()
    opt = fusedopt.Adam(learning_rate=1e-3, clipnorm=1.0)
    opt.apply(grads, flat)

NumPy buffers take the kernels compiled for the CPU (or the NumPy reference, without a
C++ compiler or with executor="numpy"); CuPy buffers take the fused CUDA path.
"""

from . import schedules
from .checkpoint import load, save
from .flat import FlatBuffer, Layout
from .loss_scale import LossScaleOptimizer
from .optimizer import FusedOptimizer, available, get
from .optimizers import (SGD, Adadelta, Adafactor, Adagrad, Adam, Adamax, AdamW, Ftrl, Lamb,
                         Lion, Muon, Nadam, RMSprop, ScheduleFreeAdamW)

__version__ = "0.1.0"

__all__ = [
    "FlatBuffer", "Layout", "FusedOptimizer", "get", "available", "schedules", "save", "load",
    "SGD", "RMSprop", "Adagrad", "Adadelta", "Adam", "AdamW", "Adamax", "Nadam", "Ftrl",
    "Lion", "ScheduleFreeAdamW", "Lamb", "Adafactor", "Muon", "LossScaleOptimizer",
]
