"""Test-session settings: one torch thread.

The suite is dominated by many small tensor operations, for which thread start-up costs more
than it saves, and on a shared 2-core machine two threads per process fight other jobs.
"""

import torch

torch.set_num_threads(1)
