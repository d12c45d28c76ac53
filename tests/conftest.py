"""Session-wide test setup.

Without a GPU, Triton kernels run under its interpreter, which must be chosen before triton is first
imported anywhere (bitsandbytes, pulled in by galore-torch, imports it too), so it is set here."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
