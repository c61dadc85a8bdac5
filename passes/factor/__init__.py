"""Low-rank factorisation: SVD bottlenecks for fully connected layers (``svd``) and conv
splitting (``lowrank``: Jaderberg / Tucker-2), over the shared maths in ``factorize``."""

from .lowrank import LowrankPass
from .svd import SvdPass

__all__ = ["LowrankPass", "SvdPass"]
