import os

import torch

# Tiny models are dominated by per-op overhead: on the 2-core CI machine one thread avoids
# oversubscription when pytest and torch's intra-op pool compete (measured ~5x faster here).
if "OMP_NUM_THREADS" not in os.environ:
    torch.set_num_threads(1)
