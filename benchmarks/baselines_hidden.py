"""The hidden-state path (lm_head + per-sequence log-probs + DPO), the ways others do it, all with
one signature:

    fn(hidden[2B, T, H], weight[V, H], labels[2B, T], ref_logps[2B], beta) -> loss (scalar)

differentiable with respect to ``hidden`` and ``weight``: the DPO sigmoid loss on per-sequence
*summed* log-probs (first half chosen, second half rejected, mean over pairs, TRL's convention),
no bias, no shift (labels are aligned with the hidden rows). ``get_hidden_baseline(name,
device)`` returns the function or raises :class:`baselines.Unavailable` with the reason (package
missing, wrong device, ours not built yet), so that suites and reports skip it cleanly.

- ``eager``: ``hidden @ weight.T`` materialized for every token, ``log_softmax(logits.float())``
  + gather, summed per sequence.
- ``liger``: Liger's ``LigerFusedLinearDPOLoss`` (``average_log_prob=False``: sums, like ours;
  ``loss_type='sigmoid'``; its default ``chunk_size=1`` pair; ``compiled=False`` on the CPU, its
  default ``torch.compile`` on CUDA). Liger takes no precomputed reference log-probs (only a
  reference model's hidden states and weight), so it runs with ``use_ref_model=False``: the same
  work, but its loss value is the one against a zero reference.
- ``trl_chunked``: TRL >= 1.16's fused lm head, ``trl/kernels/chunked_logprob.py::
  ChunkedLogProbFunction`` with the vocabulary chunk its trainer uses (32768), log-probs only
  (no optional outputs), on the valid tokens only (what TRL does on Triton devices; on the CPU it
  folds the tiles with torch ops). Exact; recomputes the logits in backward; fp32 weight-gradient
  buffer. Loaded from ``trl.kernels.chunked_logprob``, or straight from the file when ``trl``'s
  ``__init__`` cannot import (a stand-in ``transformers.utils.is_triton_available`` is lent
  during the load only when ``transformers`` is missing). Its backward imports
  ``trl.trainer.utils.maybe_gather_lm_head_ctx``; where that cannot import (no ``datasets`` on
  the GPU image) a stand-in module whose ``maybe_gather_lm_head_ctx`` returns a null context is
  registered as ``trl.trainer.utils``.
- ``cce`` / ``cce_exact``: Apple's Cut Cross-Entropy, ``linear_cross_entropy(...,
  reduction='none')`` (``logp = -loss``), with its default gradient filtering (approximate) and
  with ``filter_eps=None`` (exact). CUDA only.
- ``ours_one_pass`` / ``ours_two_phase`` / ``ours_split``: ``dpo_kernels.fused_linear_dpo_loss(..., mode=...)``;
  ``ours_split_fused_mm``: split with its backward slices' logits gradient forced into the fused
  Triton matmul (``logits_grad_matmul.py``; CUDA only);
  ``ours_split_tuned`` / ``ours_one_pass_tuned``: split / one_pass with everything
  ``token_kernel_sweep.py`` found faster than the rules applied (:func:`tuned_rules`; CUDA only,
  and only where ``DPO_BENCH_TUNED`` names its ``tuned.json``);
  ``ours_one_pass_160mib``: one_pass with chunks of 160 MiB of logits (low memory: pairs larger
  than a chunk are cut into pieces)
  (``validate=False``); unavailable while ``dpo_kernels`` has no ``fused_linear_dpo_loss``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import math
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from baselines import Unavailable

from dpo_kernels.bench import (
    BETA, IGNORE_INDEX, Shape, dpo_sigmoid_loss, dtype_name, eager_sequence_logps, fmt_bytes,
)

HiddenLossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]

# TRL's DPOTrainer vocabulary chunk for the fused lm head (trl/trainer/utils.py, TRL 1.16)
TRL_CHUNK_SIZE = 32768


# --------------------------------------------------------------------------------------------
# Shapes and inputs


@dataclass(frozen=True)
class HiddenShape(Shape):
    """A logits-path :class:`dpo_kernels.bench.Shape` (pairs, seq, vocab, dtype, prompt_frac) plus
    the hidden size ``hidden`` of the lm_head ``[V, H]``; build it with keywords."""

    hidden: int = 0

    @property
    def tokens(self) -> int:
        return self.sequences * self.seq

    @property
    def valid_tokens(self) -> int:
        return self.sequences * (self.seq - self.prompt_tokens)

    @property
    def matmul_flops(self) -> float:
        """Flops of one ``[N_valid, H] x [H, V]`` matmul (the floors count valid tokens only)."""
        return 2.0 * self.valid_tokens * self.hidden * self.vocab

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def grads_bytes(self) -> int:
        """The gradients every variant must return: hidden's and weight's."""
        return (self.tokens * self.hidden + self.vocab * self.hidden) * self.element_size

    def id(self) -> str:
        return (f"{self.sequences}x{self.seq}-H{self.hidden}-V{self.vocab}-{dtype_name(self.dtype)}"
                f"-prompt{int(round(self.prompt_frac * 100))}")

    def describe(self) -> str:
        return (f"{self.sequences} x {self.seq} tokens, H={self.hidden}, V={self.vocab}, {dtype_name(self.dtype)}, "
                f"first {self.prompt_frac:.0%} ignored ({self.valid_tokens} valid tokens; full logits would be "
                f"{fmt_bytes(self.logits_bytes)})")

    def replace(self, **kw) -> "HiddenShape":
        return dataclasses.replace(self, **kw)


def make_hidden_batch(shape: HiddenShape, device, seed: int = 0, logit_std: float = 2.0):
    """``hidden [2B, T, H] ~ N(0, 1)`` and ``weight [V, H] ~ N(0, logit_std^2 / H)`` (logits of
    standard deviation ~``logit_std``), drawn directly in the dtype (no fp32 temporary), both
    leaves requiring grad; labels with the first ``prompt_frac`` of tokens ignored."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.empty(shape.sequences, shape.seq, shape.hidden, dtype=shape.dtype, device=device)
    hidden.normal_(0.0, 1.0, generator=gen)
    weight = torch.empty(shape.vocab, shape.hidden, dtype=shape.dtype, device=device)
    weight.normal_(0.0, logit_std / math.sqrt(shape.hidden), generator=gen)
    labels = torch.randint(0, shape.vocab, (shape.sequences, shape.seq), device=device, generator=gen)
    labels[:, : shape.prompt_tokens] = IGNORE_INDEX
    return hidden.requires_grad_(True), weight.requires_grad_(True), labels


@torch.no_grad()
def policy_sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          ignore_index: int = IGNORE_INDEX, max_chunk_bytes: int = 1 << 30) -> torch.Tensor:
    """fp32 per-sequence summed log-probs of ``hidden @ weight.T``, a chunk of valid tokens at a
    time (never the full logits); used to put the reference log-probs near the policy's."""
    S, T, H = hidden.shape
    V = weight.shape[0]
    mask = labels != ignore_index
    seq_ids = torch.arange(S, device=hidden.device).unsqueeze(1).expand(S, T)[mask]
    h, y = hidden[mask], labels[mask]
    out = torch.zeros(S, dtype=torch.float32, device=hidden.device)
    rows = max(1, max_chunk_bytes // (V * 4))
    for i in range(0, h.shape[0], rows):
        z = (h[i:i + rows] @ weight.t()).float()
        lp = z.gather(-1, y[i:i + rows].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, -1)
        out.index_add_(0, seq_ids[i:i + rows], lp)
        del z
    return out


def near_reference_logps(hidden, weight, labels, seed: int = 1, spread: float = 5.0) -> torch.Tensor:
    """Reference log-probs within ~``spread`` nats of the policy's, so that the DPO margins (and
    every per-sequence coefficient) are O(1), as in training, rather than saturated."""
    seq = policy_sequence_logps(hidden, weight, labels)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return seq + spread * torch.randn(seq.shape, generator=gen).to(seq.device)


# --------------------------------------------------------------------------------------------
# eager


def eager(hidden, weight, labels, ref_logps, beta: float = BETA) -> torch.Tensor:
    """``hidden @ weight.T`` for every token, ``log_softmax(logits.float()).gather``, summed."""
    logits = hidden @ weight.t()
    return dpo_sigmoid_loss(eager_sequence_logps(logits, labels, IGNORE_INDEX), ref_logps, beta)


def float64_oracle(hidden, weight, labels, ref_logps, weight_rows, beta: float = BETA):
    """``(loss, grad_hidden, grad_weight[weight_rows])`` in float64: autograd through materialized
    fp64 logits of the same inputs (the yardstick of the hidden-path correctness checks)."""
    h64 = hidden.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    loss64 = eager(h64, w64, labels, ref_logps.double(), beta)
    gh64, gw64 = torch.autograd.grad(loss64, (h64, w64))
    return loss64.detach(), gh64, gw64[weight_rows]


def row_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max over rows of max |got - want| / max |want| of the row (inf where want's row is 0 and
    got's is not)."""
    g, e = got.double(), want.double()
    diff = (g - e).abs().amax(-1)
    scale = e.abs().amax(-1)
    rel = torch.where(scale > 0, diff / scale.clamp(min=1e-300), torch.where(diff > 0, torch.inf, 0.0))
    return float(rel.max()) if rel.numel() else 0.0


# --------------------------------------------------------------------------------------------
# Liger: LigerFusedLinearDPOLoss


def _load_liger_dpo():
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    except Exception:
        try:
            from liger_kernel.chunked_loss.dpo_loss import LigerFusedLinearDPOLoss
        except Exception as exc:
            raise Unavailable(f"liger_kernel's LigerFusedLinearDPOLoss not importable: {type(exc).__name__}: {exc}") from None
    return LigerFusedLinearDPOLoss


_liger_modules: dict = {}


def liger(hidden, weight, labels, ref_logps, beta: float = BETA) -> torch.Tensor:
    """``LigerFusedLinearDPOLoss(weight, hidden, labels)``: sums of log-probs, sigmoid, mean over
    pairs; ``use_ref_model=False`` (Liger takes no precomputed reference: same work, loss value
    against a zero reference); ``compiled`` only on CUDA."""
    compiled = hidden.device.type == "cuda"
    key = (compiled, float(beta))
    if key not in _liger_modules:
        cls = _load_liger_dpo()
        _liger_modules[key] = cls(ignore_index=IGNORE_INDEX, beta=beta, compiled=compiled, use_ref_model=False,
                                  average_log_prob=False, loss_type="sigmoid", compute_nll_loss=False)
    out = _liger_modules[key](weight, hidden, labels)
    return out[0] if isinstance(out, (tuple, list)) else out


# --------------------------------------------------------------------------------------------
# TRL >= 1.16: trl/kernels/chunked_logprob.py::ChunkedLogProbFunction

_trl_cache: dict = {}


def _null_lm_head_ctx(*params):
    return contextlib.nullcontext()


def _ensure_trl_trainer_utils(notes: list[str]) -> None:
    """Make ``trl.trainer.utils.maybe_gather_lm_head_ctx`` importable for the backward: the real
    module where it imports, else a stand-in returning a null context (no ZeRO-3 here)."""
    if "trl.trainer.utils" in sys.modules and hasattr(sys.modules["trl.trainer.utils"], "maybe_gather_lm_head_ctx"):
        return
    try:
        importlib.import_module("trl.trainer.utils")
        notes.append("backward uses the real trl.trainer.utils")
        return
    except Exception as exc:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    stub = types.ModuleType("trl.trainer.utils")
    stub.maybe_gather_lm_head_ctx = _null_lm_head_ctx
    stub.__dict__["__stand_in__"] = True
    sys.modules["trl.trainer.utils"] = stub
    notes.append(f"trl.trainer.utils not importable ({reason}); a stand-in with a null "
                 "maybe_gather_lm_head_ctx is registered")


@contextlib.contextmanager
def _transformers_stand_in(notes: list[str]):
    """Lend ``transformers.utils.is_triton_available`` for the load of the kernel file only when
    ``transformers`` is missing (the kernel file imports nothing else from it)."""
    try:
        importlib.import_module("transformers.utils")
        yield
        return
    except Exception:
        pass
    missing = object()
    saved = {name: sys.modules.get(name, missing) for name in ("transformers", "transformers.utils")}
    pkg = types.ModuleType("transformers")
    utils = types.ModuleType("transformers.utils")
    utils.is_triton_available = lambda: importlib.util.find_spec("triton") is not None
    pkg.utils = utils
    sys.modules["transformers"], sys.modules["transformers.utils"] = pkg, utils
    notes.append("transformers missing: a stand-in is_triton_available was lent for the load")
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is missing:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def load_trl_chunked():
    """``(ChunkedLogProbFunction, notes)``, importing as little of TRL as possible."""
    if "fn" in _trl_cache:
        return _trl_cache["fn"], _trl_cache["notes"]
    errors, notes = [], []
    function = None
    try:
        module = importlib.import_module("trl.kernels.chunked_logprob")
        function = module.ChunkedLogProbFunction
        notes.append("imported trl.kernels.chunked_logprob")
    except Exception as exc:
        errors.append(f"import trl.kernels.chunked_logprob: {type(exc).__name__}: {exc}")
    if function is None:
        try:
            spec = importlib.util.find_spec("trl")
        except Exception as exc:
            spec = None
            errors.append(f"find_spec('trl'): {exc}")
        if spec is None:
            errors.append("trl is not installed")
        else:
            for location in spec.submodule_search_locations or []:
                path = Path(location) / "kernels" / "chunked_logprob.py"
                if not path.is_file():
                    continue
                # Its own package name, so that the backward's `from ..trainer.utils import` resolves.
                file_spec = importlib.util.spec_from_file_location("trl.kernels.chunked_logprob", path)
                module = importlib.util.module_from_spec(file_spec)
                try:
                    with _transformers_stand_in(notes):
                        file_spec.loader.exec_module(module)
                    function = module.ChunkedLogProbFunction
                    notes.append(f"loaded {path} directly")
                    break
                except Exception as exc:
                    errors.append(f"load {path}: {type(exc).__name__}: {exc}")
            if function is None:
                errors.append("trl has no loadable kernels/chunked_logprob.py (TRL < 1.16?)")
    if function is None:
        raise Unavailable("; ".join(errors))
    _ensure_trl_trainer_utils(notes)
    _trl_cache["fn"], _trl_cache["notes"] = function, notes
    return function, notes


def trl_chunked(hidden, weight, labels, ref_logps, beta: float = BETA) -> torch.Tensor:
    """TRL >= 1.16's fused lm head on the valid tokens (log-probs only), scattered back and
    summed per sequence, under the same DPO sigmoid loss."""
    function, _ = load_trl_chunked()
    mask = labels != IGNORE_INDEX
    logps = function.apply(hidden[mask], weight, None, labels[mask], 1.0, TRL_CHUNK_SIZE, None, 1.0, ())[0]
    per_token = torch.zeros(mask.shape, dtype=logps.dtype, device=logps.device).masked_scatter(mask, logps)
    return dpo_sigmoid_loss(per_token.float().sum(-1), ref_logps, beta)


# --------------------------------------------------------------------------------------------
# Apple Cut Cross-Entropy


def _load_cce():
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception as exc:
        raise Unavailable(f"cut_cross_entropy not importable: {type(exc).__name__}: {exc}") from None
    return linear_cross_entropy


def _cce(hidden, weight, labels, ref_logps, beta, exact: bool) -> torch.Tensor:
    fn = _load_cce()
    S, T, H = hidden.shape
    kwargs = {"filter_eps": None} if exact else {}
    loss = fn(hidden.reshape(S * T, H), weight, labels.reshape(-1), ignore_index=IGNORE_INDEX,
              reduction="none", **kwargs)
    return dpo_sigmoid_loss(-loss.float().view(S, T).sum(-1), ref_logps, beta)


def cce(hidden, weight, labels, ref_logps, beta: float = BETA) -> torch.Tensor:
    """CCE with its default gradient filtering (approximate gradients)."""
    return _cce(hidden, weight, labels, ref_logps, beta, exact=False)


def cce_exact(hidden, weight, labels, ref_logps, beta: float = BETA) -> torch.Tensor:
    """CCE with ``filter_eps=None`` (exact; 25.1.1 has no ``cce_exact`` impl)."""
    return _cce(hidden, weight, labels, ref_logps, beta, exact=True)


# --------------------------------------------------------------------------------------------
# Ours


def _load_ours():
    import dpo_kernels

    fn = getattr(dpo_kernels, "fused_linear_dpo_loss", None)
    if fn is None:
        raise Unavailable("dpo_kernels has no fused_linear_dpo_loss yet (not available)")
    return fn


# one_pass's chunk budget in the low-memory configuration: 160 MiB of logits (640 tokens at
# V = 128256 in bf16), which keeps its extra memory near the gradients' own (the issue-5 low-memory
# target at 8 x 1024: <= 1.3 GB with 1.12 GB of gradients). Pairs larger than a chunk are cut into
# pieces whose logits are formed again for their gradient (dpo_kernels.linear.OnePass).
LOW_MEMORY_CHUNK_BYTES = 160 << 20


def ours(mode: str, chunk_bytes: int | None = None) -> HiddenLossFn:
    def fn(hidden, weight, labels, ref_logps, beta: float = BETA) -> torch.Tensor:
        chunk = None
        if chunk_bytes is not None:
            from dpo_kernels import linear

            chunk = linear.chunk_size(weight.shape[0], hidden.dtype, None, None, chunk_bytes)
        return _load_ours()(hidden, weight, labels, ref_logps=ref_logps, beta=beta, loss_type="sigmoid",
                            ignore_index=IGNORE_INDEX, mode=mode, chunk_tokens=chunk, validate=False).loss

    fn.__name__ = f"ours_{mode}" + ("" if chunk_bytes is None else f"_{chunk_bytes >> 20}mib")
    return fn


# The token sweep's timings, applied to whole steps. ``token_kernel_sweep.py`` writes
# ``tuned.json``: the fastest fused-matmul tile at split's slice (and whether it beat cuBLAS + the
# backward kernel), each token kernel's configuration that beat pick_config's at a row length the
# hidden path launches it on, and per row length whether the one-kernel forward-and-gradient beat
# the two kernels. ``gpu_checks.sh`` names that file in this variable, so that the scripts after
# the sweep, in the same device call, time the whole step with what it found: the fused variants
# at its tile, the tuned variants with all of it. Unset, or no such file: the library's rules.
TUNED_ENV = "DPO_BENCH_TUNED"


@dataclass(frozen=True)
class Tuning:
    """The contents of the token sweep's ``tuned.json`` (see :data:`TUNED_ENV`)."""

    matmul: object | None  # config.MatmulConfig: the fastest fused tile at split's slice
    matmul_note: str  # where and how fast, in words
    fused_beats_unfused: bool
    kernels: tuple  # (kernel, vocab_size, block_v, num_warps, lane_stats) that beat the rule
    forward_and_grad: tuple  # (vocab_size, one kernel?, block_v, num_warps, lane_stats; None: the rule's)

    @classmethod
    def load(cls) -> "Tuning | None":
        import json

        path = os.environ.get(TUNED_ENV)
        if not path or not os.path.exists(path):
            return None
        from dpo_kernels.backends.triton.config import MatmulConfig

        try:
            with open(path) as f:
                found = json.load(f)
        except (OSError, ValueError) as exc:  # unreadable: the rules, and say why
            print(f"baselines_hidden: ignoring {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return None
        mm = found.get("matmul")
        note = "" if mm is None else (f"{mm['label']}: the token sweep's fastest at {mm['slice']} "
                                      f"({mm['fused_us']:.1f} us, unfused {mm['unfused_us']:.1f} us)")
        return cls(
            matmul=None if mm is None else MatmulConfig(**mm["config"]), matmul_note=note,
            fused_beats_unfused=mm is not None and mm["fused_us"] < mm["unfused_us"],
            kernels=tuple((k["kernel"], k["vocab_size"], k["block_v"], k["num_warps"], k.get("lane_stats"))
                          for k in found.get("kernels", [])),
            forward_and_grad=tuple((f["vocab_size"], f["one_kernel"], f.get("block_v"), f.get("num_warps"),
                                    f.get("lane_stats")) for f in found.get("forward_and_grad", [])),
        )

    def describe(self) -> str:
        """What the tuned variants apply, in words (for the reports)."""
        parts = [f"fused matmul {'on, at ' + self.matmul_note if self.fused_beats_unfused else 'off (not faster)'}"
                 if self.matmul is not None else "fused matmul: not timed (rule)"]
        lanes = {True: ", lane statistics", False: "", None: ""}
        parts += [f"{k} at V={v}: block {b}, {w} warps{lanes[ls]}" for k, v, b, w, ls in self.kernels]
        parts += [f"forward-and-gradient at V={v}: "
                  + (("one kernel" + (f", block {b}, {w} warps{lanes[ls]}" if b else "")) if one else "two kernels")
                  for v, one, b, w, ls in self.forward_and_grad]
        return "; ".join(parts) if parts else "nothing"


def swept_matmul_config():
    """The fastest fused tile the token sweep found (``config.MatmulConfig``), or None."""
    tuning = Tuning.load()
    return None if tuning is None else tuning.matmul


def swept_matmul_label() -> str:
    """Which tile the fused variants run at, in words (for the reports)."""
    tuning = Tuning.load()
    if tuning is None or tuning.matmul is None:
        return "the default (pick_matmul_config; no swept tile given)"
    return tuning.matmul_note


@contextlib.contextmanager
def fused_logits_grad_matmul():
    """The Triton backend's fused logits-gradient matmul forced on for the backward of split and
    two_phase (``config.fuse_logits_grad`` keeps the unfused path on a GPU until it is timed), at
    the tile :func:`swept_matmul_config` names if any (for 16-bit inputs: the sweep timed bf16)."""
    from dpo_kernels.backends.triton.config import set_logits_grad_fusion, set_matmul_config_override

    set_logits_grad_fusion(True)
    set_matmul_config_override(swept_matmul_config(), dtypes=(torch.bfloat16, torch.float16))
    try:
        yield
    finally:
        set_logits_grad_fusion(None)
        set_matmul_config_override(None)


@contextlib.contextmanager
def tuned_rules():
    """Everything the token sweep found faster than the library's rules, applied at once (see
    :class:`Tuning`): the fused matmul at its tile where it beat the unfused path, the token
    kernels' configurations, and the forward-and-gradient's way per row length. Raises
    :class:`Unavailable` without a tuning file."""
    from dpo_kernels.backends.triton import config

    tuning = Tuning.load()
    if tuning is None:
        raise Unavailable(f"no token-sweep tuning ({TUNED_ENV} names no file): run gpu_checks.sh")
    try:
        if tuning.fused_beats_unfused:
            config.set_logits_grad_fusion(True)
            config.set_matmul_config_override(tuning.matmul, dtypes=(torch.bfloat16, torch.float16))
        for kernel, vocab, block, warps, lanes in tuning.kernels:
            config.set_kernel_override(kernel, vocab, block, warps, lanes)
        for vocab, one, block, warps, lanes in tuning.forward_and_grad:
            config.set_forward_and_grad_fusion(one, vocab_size=vocab)
            if one and block:
                config.set_kernel_override("forward_and_grad", vocab, block, warps, lanes)
        yield tuning
    finally:
        config.set_logits_grad_fusion(None)
        config.set_matmul_config_override(None)
        config.clear_kernel_overrides()
        for vocab, *_ in tuning.forward_and_grad:
            config.set_forward_and_grad_fusion(None, vocab_size=vocab)


# --------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class HiddenVariant:
    id: str
    description: str
    fn: HiddenLossFn
    cuda_only: bool = False
    floor_matmuls: int = 3  # the matmuls an exact method of its kind needs at least
    ours: bool = False
    # Held around the whole step (forward and backward): library rules the variant forces.
    rules: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    needs_tuning: bool = False  # runs only with the token sweep's tuning (tuned_rules)

    def check(self, device) -> None:
        """Raise :class:`Unavailable` if this variant cannot run on ``device``."""
        device = torch.device(device)
        if self.cuda_only and device.type != "cuda":
            raise Unavailable(f"{self.id} is a Triton GPU kernel: needs a CUDA device (got {device.type})")
        if self.needs_tuning and Tuning.load() is None:
            raise Unavailable(f"{self.id} applies the token sweep's tuning, and {TUNED_ENV} names no file "
                              "(gpu_checks.sh runs the sweep first)")
        if self.ours:
            _load_ours()
        elif self.id == "liger":
            _load_liger_dpo()
        elif self.id == "trl_chunked":
            load_trl_chunked()
        elif self.id.startswith("cce"):
            _load_cce()

    def step(self, hidden, weight, labels, ref_logps, beta: float = BETA):
        """A no-argument callable: forward + backward once, returning (grad hidden, grad weight)."""

        def run():
            with self.rules():
                loss = self.fn(hidden, weight, labels, ref_logps, beta)
                return torch.autograd.grad(loss, (hidden, weight))

        return run


HIDDEN_VARIANTS: list[HiddenVariant] = [
    HiddenVariant("ours_one_pass", "ours: fused_linear_dpo_loss(mode='one_pass') (3 matmuls)", ours("one_pass"),
                  floor_matmuls=3, ours=True),
    HiddenVariant("ours_two_phase", "ours: fused_linear_dpo_loss(mode='two_phase') (4 matmuls, low memory)",
                  ours("two_phase"), floor_matmuls=4, ours=True),
    HiddenVariant("ours_split", "ours: fused_linear_dpo_loss(mode='split') (4 matmuls, low memory, every gradient "
                  "rounded once)", ours("split"), floor_matmuls=4, ours=True),
    HiddenVariant("ours_split_fused_mm",
                  "ours: mode='split', the backward slices' logits gradient in the fused Triton matmul "
                  "(forced: the rule keeps cuBLAS + kernel until this is timed)", ours("split"), cuda_only=True,
                  floor_matmuls=4, ours=True, rules=fused_logits_grad_matmul),
    HiddenVariant("ours_split_tuned",
                  "ours: mode='split' with everything the token sweep found faster (the fused matmul where it beat "
                  "cuBLAS + kernel, token-kernel blocks, the forward-and-gradient's way)", ours("split"),
                  cuda_only=True, floor_matmuls=4, ours=True, rules=tuned_rules, needs_tuning=True),
    HiddenVariant("ours_one_pass_tuned",
                  "ours: mode='one_pass' with the token sweep's faster token-kernel blocks", ours("one_pass"),
                  cuda_only=True, floor_matmuls=3, ours=True, rules=tuned_rules, needs_tuning=True),
    HiddenVariant("ours_one_pass_160mib",
                  "ours: mode='one_pass', chunk_tokens of 160 MiB of logits (pairs cut into pieces, earlier "
                  "pieces' logits formed again: 3 to 4 matmuls, low memory)",
                  ours("one_pass", LOW_MEMORY_CHUNK_BYTES), floor_matmuls=3, ours=True),
    HiddenVariant("eager", "eager `hidden @ weight.T` + `log_softmax(float).gather`", eager, floor_matmuls=3),
    HiddenVariant("liger", "Liger `LigerFusedLinearDPOLoss` (sums, zero reference)", liger, floor_matmuls=3),
    HiddenVariant("trl_chunked", "TRL >= 1.16 fused lm head (`trl/kernels/chunked_logprob.py`, exact)",
                  trl_chunked, floor_matmuls=4),
    HiddenVariant("cce", "Apple CCE, default gradient filtering (approximate)", cce, cuda_only=True, floor_matmuls=4),
    HiddenVariant("cce_exact", "Apple CCE, `filter_eps=None` (exact)", cce_exact, cuda_only=True, floor_matmuls=4),
]
HIDDEN_BY_ID = {v.id: v for v in HIDDEN_VARIANTS}


def get_hidden_baseline(name: str, device) -> HiddenLossFn:
    """The variant ``name``'s loss function if it can run on ``device``, else :class:`Unavailable`."""
    if name not in HIDDEN_BY_ID:
        raise ValueError(f"unknown hidden-path variant {name!r}; one of {sorted(HIDDEN_BY_ID)}")
    variant = HIDDEN_BY_ID[name]
    variant.check(device)
    return variant.fn


def has_ours() -> bool:
    import dpo_kernels

    return hasattr(dpo_kernels, "fused_linear_dpo_loss")
