"""Built-in passes (installed as ``onnxslim_cnn.passes``); importing this registers them."""

from .fp16 import Fp16Pass  # noqa: F401
from .lowrank import LowrankPass  # noqa: F401
from .prune import PrunePass
from .q8 import Q8Pass  # noqa: F401
from .slim import SlimPass
from .sparsify import SparsifyPass  # noqa: F401
from .svd import SvdPass  # noqa: F401

__all__ = ["PrunePass", "SlimPass"]
