"""Built-in passes (installed as ``onnxslim_cnn.passes``); importing this registers them."""

from .fp16 import Fp16Pass
from .fpga import FpgaPass
from .factor import LowrankPass
from .prune import PrunePass
from .q8 import Q8Pass
from .share import SharePass
from .slim import SlimPass
from .sparse import SparsePass
from .sparsify import SparsifyPass
from .factor import SvdPass

__all__ = ["Fp16Pass", "FpgaPass", "LowrankPass", "PrunePass", "Q8Pass", "SharePass", "SlimPass", "SparsePass",
           "SparsifyPass", "SvdPass"]
