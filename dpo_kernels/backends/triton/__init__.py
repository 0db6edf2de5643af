"""Triton backend: the kernel contract on the GPU (and on the CPU through TRITON_INTERPRET=1)."""
from .config import fuse_logits_grad
from .dpo_sigmoid_loss import dpo_sigmoid_loss
from .logits_grad_matmul import logits_grad_matmul
from .scale import scale_
from .token_logprobs_bwd import token_logprobs_backward
from .token_logprobs_fwd import token_logprobs_forward, token_logprobs_forward_and_grad_

__all__ = [
    "token_logprobs_forward", "token_logprobs_backward", "token_logprobs_forward_and_grad_", "dpo_sigmoid_loss",
    "scale_", "logits_grad_matmul", "fuse_logits_grad",
]
