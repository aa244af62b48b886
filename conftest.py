import os

import torch

# Triton decides between compiling and interpreting when a kernel is decorated, so this must run before any test
# module imports the kernels: without CUDA, the kernels run on CPU tensors in Triton's interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
