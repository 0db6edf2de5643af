"""Per-sequence log-probs from logits, the ways others compute them, all with one signature:

    fn(logits[2B, T, V], labels[2B, T], ignore_index) -> logps[2B] fp32, differentiable

``get_baseline(name, device)`` returns the function or raises :class:`Unavailable` (package
missing, wrong device), so that suites and reports skip it cleanly. Baselines:

- ``eager``: ``log_softmax(logits.float()).gather``, summed per sequence.
- ``trl_rowloop``: TRL's ``selective_log_softmax`` as it was before TRL 1.16 (a loop over the
  sequences doing ``log_softmax`` + ``gather`` per row for bf16/fp16; ``logsumexp`` per row for
  fp32), then TRL's masking and per-sequence sum. Pure PyTorch, runs anywhere.
- ``trl_triton``: TRL >= 1.16's Triton kernel
  (``trl/kernels/logprob_entropy.py::selective_log_softmax_and_entropy``, with ``row_mask``).
  CUDA only; ``trl`` must be importable (installed, or its directory on ``sys.path``).
- ``liger_ce``: Liger's cross-entropy kernel with ``reduction='none'`` (``logp = -CE``), on a
  clone of the logits since it writes its gradient into its input. CUDA only. (Its per-token
  losses come out in the logits dtype: bf16 per-sequence sums are coarse; timing is the point.)

Ours: ``ours(backend, inplace)`` -- ``dpo_kernels.token_logprobs`` + ``sequence_logprobs``
(no fused loss), with the in-place backward on or off.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from dpo_kernels import sequence_logprobs, token_logprobs
from dpo_kernels.bench import BETA, dpo_sigmoid_loss, eager_sequence_logps

IGNORE_INDEX = -100

SeqLogpsFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


class Unavailable(Exception):
    """This baseline cannot run here (the message says why)."""


# --------------------------------------------------------------------------------------------
# eager


def eager(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``log_softmax(logits.float(), -1).gather(...)`` summed per sequence."""
    return eager_sequence_logps(logits, labels, ignore_index)


# --------------------------------------------------------------------------------------------
# TRL before 1.16: selective_log_softmax (trl/trainer/utils.py), a loop to bound peak memory


def _trl_selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    if logits.dtype in (torch.float32, torch.float64):
        selected = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return selected - lse
    # logsumexp is unstable in bf16: TRL falls back to log_softmax one sequence at a time.
    per_token = []
    for row_logits, row_labels in zip(logits, index):
        row_logps = torch.log_softmax(row_logits, dim=-1)
        per_token.append(row_logps.gather(dim=-1, index=row_labels.unsqueeze(-1)).squeeze(-1))
    return torch.stack(per_token)


def trl_rowloop(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """TRL's pre-1.16 DPO path: labels' ignored entries set to 0, per-token log-probs by the row
    loop, masked, summed per sequence (in fp32 here; TRL summed in the logits dtype)."""
    mask = labels != ignore_index
    per_token = _trl_selective_log_softmax(logits, torch.where(mask, labels, 0))
    return (per_token.float() * mask).sum(-1)


# --------------------------------------------------------------------------------------------
# TRL >= 1.16: the Triton kernel in trl/kernels/logprob_entropy.py

_trl_fn_cache: list = []


def _load_trl_kernel():
    """``selective_log_softmax_and_entropy`` from TRL, importing as little of TRL as possible."""
    if _trl_fn_cache:
        return _trl_fn_cache[0]
    errors = []
    for module_name in ("trl.kernels.logprob_entropy", "trl.kernels"):
        try:
            module = importlib.import_module(module_name)
            fn = getattr(module, "selective_log_softmax_and_entropy")
            _trl_fn_cache.append(fn)
            return fn
        except Exception as exc:  # trl's __init__ may pull in packages the image lacks
            errors.append(f"import {module_name}: {type(exc).__name__}: {exc}")
    # Fall back to the file itself: it needs only torch and triton.
    try:
        spec = importlib.util.find_spec("trl")
    except Exception as exc:
        spec = None
        errors.append(f"find_spec('trl'): {exc}")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            path = Path(location) / "kernels" / "logprob_entropy.py"
            if path.is_file():
                file_spec = importlib.util.spec_from_file_location("_trl_logprob_entropy", path)
                module = importlib.util.module_from_spec(file_spec)
                try:
                    file_spec.loader.exec_module(module)
                    fn = module.selective_log_softmax_and_entropy
                except Exception as exc:
                    errors.append(f"load {path}: {type(exc).__name__}: {exc}")
                    continue
                _trl_fn_cache.append(fn)
                return fn
        errors.append("trl is installed but has no kernels/logprob_entropy.py (TRL < 1.16?)")
    elif spec is None:
        errors.append("trl is not installed")
    raise Unavailable("; ".join(errors))


def trl_triton(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """TRL >= 1.16: ``selective_log_softmax_and_entropy(logits, labels, row_mask=mask)``; the
    entropy output is not used (no gradient flows into it)."""
    fn = _load_trl_kernel()
    mask = labels != ignore_index
    params = inspect.signature(fn).parameters
    kwargs = {}
    if "row_mask" in params:
        kwargs["row_mask"] = mask
    if "entropy_requires_grad" in params:
        kwargs["entropy_requires_grad"] = False
    logps, _entropy = fn(logits, torch.where(mask, labels, 0), **kwargs)
    if "row_mask" not in params:
        logps = logps * mask
    return logps.float().sum(-1)


# --------------------------------------------------------------------------------------------
# Liger: LigerCrossEntropyFunction with reduction='none'


def _load_liger():
    try:
        from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction
    except Exception as exc:
        raise Unavailable(f"liger_kernel not importable: {type(exc).__name__}: {exc}") from None
    return LigerCrossEntropyFunction


def _liger_args(function, x, target, ignore_index):
    """Positional arguments of ``LigerCrossEntropyFunction.apply`` for this Liger version
    (its signature grew over releases: weight, lse_square_scale, softcap, return_z_loss, ...)."""
    params = list(inspect.signature(function.forward).parameters.values())[1:]  # after ctx
    known = {"ignore_index": ignore_index, "reduction": "none", "label_smoothing": 0.0,
             "lse_square_scale": 0.0, "weight": None, "softcap": None}
    args = [x, target]
    for p in params[2:]:
        if p.name in known:
            args.append(known[p.name])
        elif p.default is not inspect.Parameter.empty:
            args.append(p.default)
        else:
            raise Unavailable(f"unknown required argument {p.name!r} of LigerCrossEntropyFunction.forward")
    return args


def liger_ce(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``-LigerCrossEntropyFunction(logits.clone(), reduction='none')`` summed per sequence. The
    clone is part of the cost: Liger overwrites its input with the gradient in forward."""
    function = _load_liger()
    rows, T, V = logits.shape
    x = logits.reshape(rows * T, V).clone()
    out = function.apply(*_liger_args(function, x, labels.reshape(-1), ignore_index))
    loss = out[0] if isinstance(out, (tuple, list)) else out
    if loss.dim() != 1 or loss.shape[0] != rows * T:
        raise Unavailable(f"this liger_kernel returned a loss of shape {tuple(loss.shape)} for "
                          "reduction='none' (no per-token losses)")
    return -loss.float().view(rows, T).sum(-1)


# --------------------------------------------------------------------------------------------
# Ours: the token path, no fused loss


def ours(backend: str = "auto", inplace: bool = False) -> SeqLogpsFn:
    def fn(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
        tok = token_logprobs(logits, labels, ignore_index=ignore_index, backend=backend, inplace_backward=inplace)
        return sequence_logprobs(tok.logp, tok.labels, ignore_index, average=False)

    fn.__name__ = f"ours_{backend}{'_inplace' if inplace else ''}"
    return fn


# --------------------------------------------------------------------------------------------
# Registry

BASELINES: dict[str, SeqLogpsFn] = {
    "eager": eager,
    "trl_rowloop": trl_rowloop,
    "trl_triton": trl_triton,
    "liger_ce": liger_ce,
}
CUDA_ONLY = {"trl_triton", "liger_ce"}
DESCRIPTIONS = {
    "eager": "eager `log_softmax(logits.float()).gather`",
    "trl_rowloop": "TRL's older per-row loop (`selective_log_softmax` < 1.16)",
    "trl_triton": "TRL >= 1.16 Triton kernel (`trl/kernels/logprob_entropy.py`)",
    "liger_ce": "Liger cross-entropy kernel (reduction='none'), incl. its clone",
}


def get_baseline(name: str, device) -> SeqLogpsFn:
    """The baseline ``name`` if it can run on ``device``, else :class:`Unavailable`."""
    device = torch.device(device)
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; one of {sorted(BASELINES)}")
    if name in CUDA_ONLY and device.type != "cuda":
        raise Unavailable(f"{name} is a Triton GPU kernel: needs a CUDA device (got {device.type})")
    if name == "trl_triton":
        _load_trl_kernel()
    elif name == "liger_ce":
        _load_liger()
    return BASELINES[name]


def package_versions() -> dict[str, str]:
    """Installed versions of the anchor packages (``not installed`` when absent)."""
    from importlib import metadata

    versions = {}
    for dist in ("trl", "liger-kernel", "cut-cross-entropy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def ours_backends(device) -> list[str]:
    """Backends of ours worth timing on ``device``: every available one except Triton's CPU
    interpreter, and except the plain PyTorch fallback on CUDA."""
    from dpo_kernels.backends import available_backends

    device = torch.device(device)
    names = []
    for name in available_backends(device):
        if device.type == "cpu" and name == "triton":
            continue
        if device.type == "cuda" and name == "reference":
            continue
        names.append(name)
    return names


# --------------------------------------------------------------------------------------------
# Variants of the logits path: one forward + backward step each, for suites and reports


@dataclass(frozen=True)
class Variant:
    """One way to get d(DPO sigmoid loss)/d(logits): a per-sequence log-probs function under the
    same loss, or ours end to end (``fused=True``: ``fused_dpo_loss``)."""

    id: str
    description: str
    baseline: str | None = None  # a name in BASELINES
    backend: str | None = None  # ours
    inplace: bool = False  # overwrites the logits with their gradient
    fused: bool = False

    def seq_logps_fn(self, device) -> SeqLogpsFn:
        if self.baseline is not None:
            return get_baseline(self.baseline, device)
        return ours(self.backend, self.inplace)

    def step(self, logits: torch.Tensor, labels: torch.Tensor, ref_logps: torch.Tensor,
             beta: float = BETA, ignore_index: int = IGNORE_INDEX) -> Callable[[], torch.Tensor]:
        """A no-argument callable running forward + backward once and returning d loss / d logits
        (raises :class:`Unavailable` now if the variant cannot run here)."""
        if self.fused:
            from dpo_kernels import fused_dpo_loss

            def fused_step():
                out = fused_dpo_loss(logits, labels, ref_logps=ref_logps, beta=beta, backend=self.backend,
                                     inplace_backward=self.inplace, validate=False, ignore_index=ignore_index)
                return torch.autograd.grad(out.loss, logits)[0]

            return fused_step
        fn = self.seq_logps_fn(logits.device)

        def seq_step():
            loss = dpo_sigmoid_loss(fn(logits, labels, ignore_index), ref_logps, beta)
            return torch.autograd.grad(loss, logits)[0]

        return seq_step


def logits_path_variants(backends: list[str]) -> list[Variant]:
    """Ours on each backend (token path in place or not, and the fused loss), then the baselines,
    the riskiest (third-party Triton kernels) last."""
    variants = []
    for b in backends:
        variants += [
            Variant(f"ours[{b}]", f"ours: token_logprobs + sequence_logprobs ({b})", backend=b),
            Variant(f"ours[{b}]+inplace", f"ours, in-place backward ({b})", backend=b, inplace=True),
            Variant(f"fused_dpo_loss[{b}]", f"ours: full fused_dpo_loss sigmoid step ({b})", backend=b, fused=True),
            Variant(f"fused_dpo_loss[{b}]+inplace", f"ours: fused_dpo_loss, in-place backward ({b})",
                    backend=b, fused=True, inplace=True),
        ]
    for name in ("eager", "trl_rowloop", "trl_triton", "liger_ce"):
        variants.append(Variant(name, DESCRIPTIONS[name], baseline=name))
    return variants
