"""discoloss: DisCO (Discriminative Constrained Optimization, arXiv 2505.12366) as PyTorch ops.

>>> from discoloss import disco_loss
"""

from discoloss.constraints import LagrangeMultiplier
from discoloss.kl import kl_divergence, squared_hinge_penalty
from discoloss.loss import DiscoOutput, disco_loss
from discoloss.objectives import discriminative_objective, discriminative_weights
from discoloss.options import DiscoOptions
from discoloss.scores import sequence_scores

__version__ = "0.1.0"

__all__ = [
    "DiscoOptions",
    "DiscoOutput",
    "LagrangeMultiplier",
    "disco_loss",
    "discriminative_objective",
    "discriminative_weights",
    "kl_divergence",
    "sequence_scores",
    "squared_hinge_penalty",
]
