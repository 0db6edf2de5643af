"""Fused kernels for Direct Preference Optimization: per-sequence log-probs from logits, exact,
in three passes over the logits, and the DPO family of losses on top."""
from .api import DPOOutput, estimate_linear_memory, fused_dpo_loss, fused_linear_dpo_loss
from .kto import BCORunningMean, KTOOutput, fused_kto_loss
from .losses import LOSSES, LossOptions, PreferencePair, register_loss
from .logprobs import TokenLogprobs, sequence_logprobs, token_logprobs

__all__ = [
    "fused_dpo_loss",
    "fused_linear_dpo_loss",
    "estimate_linear_memory",
    "DPOOutput",
    "fused_kto_loss",
    "KTOOutput",
    "BCORunningMean",
    "token_logprobs",
    "sequence_logprobs",
    "TokenLogprobs",
    "LOSSES",
    "LossOptions",
    "PreferencePair",
    "register_loss",
]
__version__ = "0.1.0"
