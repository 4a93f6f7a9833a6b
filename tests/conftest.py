import os

import torch

# Tiny models are dominated by per-op overhead: on the 2-core CI machine one thread avoids
# oversubscription when other work shares the cores (the encoder tests: ~35 s with 2 threads vs ~7.5 s with 1).
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)
