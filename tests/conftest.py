import os

import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter; it reads this variable when triton is imported,
# which happens when smoe.kernels is (so before any test module).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
