"""Suite-wide settings.

One intra-op thread: the tests run many tiny kernels, for which a second OpenMP thread costs far
more than it brings, and on a loaded 2-core machine spinning threads slow small ops by 1000x."""

import torch

torch.set_num_threads(1)
