"""Parity with TRL itself: ``fused_dpo_loss`` against the real ``trl.DPOTrainer``.

For a tiny causal LM built from a config (nothing downloaded) and one preference batch, TRL's
``DPOTrainer.compute_loss`` gives the loss, the gradient of the loss w.r.t. the model's parameters and
the metrics it logs (read from ``trainer._metrics``). ``fused_dpo_loss`` is given the same model's
logits (``model(input_ids, attention_mask).logits``, ``shift=True``, labels = input_ids with the
non-completion tokens set to -100) and the reference as the reference model's logits
(``precompute_ref_log_probs=False``) or as TRL's own precomputed per-sequence reference log-probs
(``precompute_ref_log_probs=True``, ``ref_logps=``). Every loss type TRL supports and every option
(``loss_weights``, ``f_divergence_type``, ``ld_alpha``, ``use_weighting``, ``label_smoothing``) is
covered, each with the reference precomputed and not.

TRL computes its log-probs with its own fused LM head (chunked matmul + online logsumexp, fp32) and
reduces in its own order, so the two sides agree to float32 rounding, not bit for bit:

- loss and every metric: ``rtol=1e-5, atol=1e-5`` (float32 rounding of the sequence sums is
  ~1e-7..1e-6 relative; observed differences are <= 1e-6 relative);
- parameter gradients: ``rtol=1e-4, atol=1e-5 * max|grad|`` per parameter tensor (backward goes
  through two transformer layers; observed differences are <= 2.5e-6 * max|grad|).

A case whose option ``fused_dpo_loss`` does not accept yet (``inspect.signature``) or whose loss type
is not registered in ``dpo_kernels.losses.LOSSES`` is skipped, saying which: it runs by itself once
the option lands. A mismatch is never "fixed" here by a looser tolerance.
"""
from __future__ import annotations

import copy
import functools
import inspect
import math
import tempfile
import warnings
from dataclasses import dataclass, field

import pytest
import torch
from quiet_training import quiet_single_threaded

trl = pytest.importorskip("trl", reason="TRL parity tests need `trl` (pip install -e '.[dev]')")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from dpo_kernels import fused_dpo_loss  # noqa: E402
from dpo_kernels import losses as dk_losses  # noqa: E402

# transformers 5 deprecates `gradient_checkpointing` (TRL still sets and reads it): not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

LOSS_RTOL, LOSS_ATOL = 1e-5, 1e-5
GRAD_RTOL, GRAD_ATOL_REL = 1e-4, 1e-5

VOCAB = 320
BASE_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
)
TOKEN_METRICS = ("entropy", "mean_token_accuracy")

# (prompt, chosen, rejected) lengths in words: ragged, chosen longer or shorter than rejected
# (ld_alpha's shared/tail split), a one-word completion. TRL appends EOS to each completion.
LENGTHS = [(3, 5, 2), (6, 2, 4), (2, 7, 7), (4, 1, 3), (5, 4, 6)]


@dataclass(frozen=True)
class Case:
    """One TRL configuration. ``trl`` holds DPOConfig fields; ours are derived from them."""

    id: str
    loss_type: tuple[str, ...]
    trl: dict = field(default_factory=dict)

    def our_kwargs(self) -> dict:
        kw = {"beta": self.trl.get("beta", 0.1)}
        kw["loss_type"] = self.loss_type[0] if len(self.loss_type) == 1 else list(self.loss_type)
        if self.trl.get("loss_weights") is not None:
            kw["loss_weights"] = list(self.trl["loss_weights"])
        if self.trl.get("label_smoothing", 0.0):
            kw["label_smoothing"] = self.trl["label_smoothing"]
        f_div = self.trl.get("f_divergence_type", "reverse_kl")
        if f_div != "reverse_kl":
            kw["f_divergence_type"] = f_div
            if f_div == "alpha_divergence":
                kw["f_alpha_divergence_coef"] = self.trl.get("f_alpha_divergence_coef", 0.5)
        if "discopop" in self.loss_type:
            kw["discopop_tau"] = self.trl.get("discopop_tau", 0.05)
        if self.trl.get("ld_alpha") is not None:
            kw["ld_alpha"] = self.trl["ld_alpha"]
        if self.trl.get("use_weighting"):
            kw["use_weighting"] = True
        return kw


def _case(loss_type, id=None, **trl_kwargs):
    loss_type = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    return Case(id or "+".join(loss_type), loss_type, trl_kwargs)


CASES = [
    # every loss type TRL 1.16 supports, defaults otherwise
    _case("sigmoid"),
    _case("sigmoid", id="sigmoid-beta0.5", beta=0.5),
    _case("hinge"),
    _case("hinge", id="hinge-beta0.5", beta=0.5),
    _case("ipo"),
    _case("ipo", id="ipo-beta0.5", beta=0.5),
    _case("exo_pair", id="exo_pair-ls1e-3", label_smoothing=1e-3),
    _case("exo_pair", id="exo_pair-ls0.2", label_smoothing=0.2),
    _case("nca_pair"),
    _case("robust", id="robust-ls0", label_smoothing=0.0),
    _case("robust", id="robust-ls0.1", label_smoothing=0.1),
    _case("robust", id="robust-ls0.3", label_smoothing=0.3),
    _case("bco_pair"),
    _case("sppo_hard"),
    _case("aot"),
    _case("aot", id="aot-ls0.1", label_smoothing=0.1),
    _case("aot_unpaired"),
    _case("aot_unpaired", id="aot_unpaired-ls0.1", label_smoothing=0.1),
    _case("apo_zero"),
    _case("apo_down"),
    _case("discopop"),
    _case("discopop", id="discopop-tau0.3", discopop_tau=0.3, beta=0.3),
    _case("sft"),
    _case("sigmoid_norm"),
    _case("sigmoid_norm", id="sigmoid_norm-beta2", beta=2.0),
    # several loss types at once
    _case(["sigmoid", "bco_pair", "sft"], id="mpo", loss_weights=[0.8, 0.2, 1.0]),
    _case(["sigmoid", "sft"], id="rpo", loss_weights=[1.0, 0.5]),
    _case(["hinge", "ipo", "apo_zero"], id="hinge+ipo+apo_zero-unweighted"),
    # f-divergences (TRL allows them for sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop, sft)
    _case("sigmoid", id="sigmoid-forward_kl", f_divergence_type="forward_kl"),
    _case("sigmoid", id="sigmoid-js", f_divergence_type="js_divergence"),
    _case("sigmoid", id="sigmoid-alpha0.5", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.5),
    _case("sigmoid", id="sigmoid-alpha1", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0),
    _case("hinge", id="hinge-js", f_divergence_type="js_divergence"),
    _case("ipo", id="ipo-forward_kl", f_divergence_type="forward_kl"),
    _case("sigmoid_norm", id="sigmoid_norm-alpha0.3", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
    _case("robust", id="robust-ls0.1-js", f_divergence_type="js_divergence", label_smoothing=0.1),
    _case("exo_pair", id="exo_pair-ls0.1-forward_kl", f_divergence_type="forward_kl", label_smoothing=0.1),
    _case("discopop", id="discopop-alpha1.5", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.5),
    _case("hinge", id="hinge-alpha-1", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=-1.0, beta=0.5),
    # (alpha - 1) * log-ratio passes 80 for one pair: TRL clamps the exponent at 80 in fp32
    _case("sigmoid", id="sigmoid-alpha20-clamped", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=20.0),
    _case(["sigmoid", "sft"], id="rpo-js", f_divergence_type="js_divergence", loss_weights=[1.0, 0.3]),
    # LD-DPO
    _case("sigmoid", id="sigmoid-ld0.5", ld_alpha=0.5),
    _case("ipo", id="ipo-ld0.3", ld_alpha=0.3),
    _case(["sigmoid", "bco_pair", "sft"], id="mpo-ld0.5", loss_weights=[0.8, 0.2, 1.0], ld_alpha=0.5),
    # WPO (TRL refuses it for aot/aot_unpaired; with `sft` in the mix TRL 1.16 itself raises: it scales
    # the expanded scalar SFT loss in place, "more than one element of the written-to tensor...")
    _case("sigmoid", id="sigmoid-wpo", use_weighting=True),
    _case("ipo", id="ipo-wpo", use_weighting=True),
    _case(["sigmoid", "bco_pair"], id="sigmoid+bco_pair-wpo", loss_weights=[0.7, 0.3], use_weighting=True),
    _case("sigmoid", id="sigmoid-wpo-ld0.5", use_weighting=True, ld_alpha=0.5),
]

# --------------------------------------------------------------------------------------------
# The tiny world: tokenizer, preference texts, policy and reference models (built once).


def _tokenizer():
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({f"w{i}": i + 3 for i in range(VOCAB - 3)})
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def _rows(tokenizer, policy):
    """Random words, except that the first two chosen words of every other pair are the policy's greedy
    continuation, so that ``mean_token_accuracy`` is neither 0 nor 1."""
    g = torch.Generator().manual_seed(7)

    def words(n):
        return [f"w{int(i)}" for i in torch.randint(0, VOCAB - 3, (n,), generator=g)]

    rows = []
    for k, (p, c, r) in enumerate(LENGTHS):
        prompt, chosen, rejected = words(p), words(c), words(r)
        if k % 2 == 0:
            ids = tokenizer(" ".join(prompt))["input_ids"]
            for j in range(min(2, c)):
                with torch.no_grad():
                    logits = policy(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
                logits[:3] = -math.inf  # a word, not a special token
                chosen[j] = tokenizer.convert_ids_to_tokens(int(logits.argmax()))
                ids = ids + [int(logits.argmax())]
        rows.append({"prompt": " ".join(prompt), "chosen": " " + " ".join(chosen), "rejected": " " + " ".join(rejected)})
    return rows


def _models():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        initializer_range=0.1, pad_token_id=0, eos_token_id=1, bos_token_id=None,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(config).float()
    policy = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the policy: the reference moved a little (log-ratios O(1), both signs)
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.15)
    return policy, ref


@functools.lru_cache(maxsize=None)
def _world():
    policy, ref = _models()
    tokenizer = _tokenizer()
    return tokenizer, _rows(tokenizer, policy), policy, ref, tempfile.mkdtemp(prefix="dpo_kernels_trl_parity_")


def _empty_prompt_rows(rows):
    """The same pairs, but the second has an empty prompt: its completions start at position 0, where
    there is no prediction (the first completion token is never scored)."""
    rows = copy.deepcopy(rows)
    rows[1] = {"prompt": "", "chosen": rows[1]["chosen"].strip(), "rejected": rows[1]["rejected"].strip()}
    return rows


def _trainer(case: Case, precompute: bool, empty_prompt: bool = False):
    tokenizer, rows, policy, ref, out_dir = _world()
    if empty_prompt:
        rows = _empty_prompt_rows(rows)
    args = trl.DPOConfig(
        output_dir=out_dir, report_to=[], use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, per_device_train_batch_size=len(rows),
        precompute_ref_log_probs=precompute, loss_type=list(case.loss_type), seed=0, **case.trl,
    )
    # A fresh dataset per trainer: TRL maps it and, with precompute_ref_log_probs, adds columns to it.
    dataset = datasets.Dataset.from_list(rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trl.DPOTrainer(
            model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=args,
            train_dataset=dataset, processing_class=copy.deepcopy(tokenizer),
        )


# --------------------------------------------------------------------------------------------
# One evaluation on each side.


def _missing(case: Case, token_metrics: bool = False) -> str | None:
    """Why ``fused_dpo_loss`` cannot run this case yet, or None."""
    params = inspect.signature(fused_dpo_loss).parameters
    wanted = list(case.our_kwargs()) + (["token_metrics"] if token_metrics else [])
    absent = [name for name in wanted if name not in params]
    if absent:
        return f"fused_dpo_loss has no option {', '.join(absent)} yet (TRL case {case.id})"
    unregistered = [name for name in case.loss_type if name not in dk_losses.LOSSES]
    if unregistered:
        return f"loss_type {', '.join(unregistered)} not registered in dpo_kernels.losses.LOSSES yet"
    return None


def _token_metrics_supported() -> bool:
    return "token_metrics" in inspect.signature(fused_dpo_loss).parameters


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


_RESULTS: dict[tuple, dict] = {}


def _run(case: Case, precompute: bool, reference_free: bool = False, empty_prompt: bool = False) -> dict:
    """TRL's and our loss, metrics and parameter gradients for one case, on the same model (once).
    ``reference_free``: give ``fused_dpo_loss`` no reference (TRL always has one); ``empty_prompt``:
    the batch of :func:`_empty_prompt_rows`."""
    key = (case.id, precompute, reference_free, empty_prompt)
    if key not in _RESULTS:
        _RESULTS[key] = _evaluate(case, precompute, reference_free, empty_prompt)
    return _RESULTS[key]


def _evaluate(case: Case, precompute: bool, reference_free: bool = False, empty_prompt: bool = False) -> dict:
    trainer = _trainer(case, precompute, empty_prompt)
    model = trainer.model
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    mode = "train" if model.training else "eval"

    # TRL
    model.zero_grad(set_to_none=True)
    trainer._metrics[mode].clear()
    trl_loss = trainer.compute_loss(model, batch)
    trl_loss.backward()
    trl_metrics = {name: values[-1] for name, values in trainer._metrics[mode].items()}
    trl_grads = _grads(model)

    # ours
    model.zero_grad(set_to_none=True)
    kwargs = case.our_kwargs()
    token_metrics = _token_metrics_supported()
    if token_metrics:
        kwargs["token_metrics"] = True
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    model_inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    if reference_free:
        kwargs["reference_free"] = True
    elif precompute:
        kwargs["ref_logps"] = (batch["ref_chosen_logps"], batch["ref_rejected_logps"])
    else:
        with torch.no_grad():
            kwargs["ref_logits"] = trainer.ref_model(**model_inputs).logits
    logits = model(**model_inputs).logits
    try:
        out = fused_dpo_loss(logits, labels, shift=True, backend="auto", **kwargs)
    except NotImplementedError:
        if not token_metrics:
            raise
        # the default (C++ on CPU) backend may not have the entropy/accuracy extras yet
        out = fused_dpo_loss(logits, labels, shift=True, backend="reference", **kwargs)
    out.loss.backward()
    ours_metrics = {name: float(value) for name, value in out.metrics.items()}
    return {
        "trl_loss": trl_loss.item(), "trl_metrics": trl_metrics, "trl_grads": trl_grads,
        "loss": out.loss.item(), "metrics": ours_metrics, "grads": _grads(model),
        "token_metrics": token_metrics,
    }


def _close(ours: float, theirs: float, what: str, case: Case, precompute: bool):
    ok = math.isclose(ours, theirs, rel_tol=LOSS_RTOL, abs_tol=LOSS_ATOL)
    assert ok, (
        f"{what}: fused_dpo_loss {ours!r} vs TRL {theirs!r} (diff {ours - theirs:.3g}; "
        f"case {case.id}, precompute_ref_log_probs={precompute}, rtol={LOSS_RTOL}, atol={LOSS_ATOL})"
    )


PRECOMPUTE = [pytest.param(False, id="ref_logits"), pytest.param(True, id="precomputed_ref_logps")]


@pytest.fixture(scope="module", autouse=True)
def _build_world_once():
    # Tiny tensors: this module runs single-threaded and quiet (quiet_training.py), restored after.
    with quiet_single_threaded():
        try:
            _world()
            yield
        finally:
            _RESULTS.clear()


# --------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("precompute", PRECOMPUTE)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_loss_and_metrics_match_trl(case, precompute):
    reason = _missing(case)
    if reason:
        pytest.skip(reason)
    r = _run(case, precompute)
    _close(r["loss"], r["trl_loss"], "loss", case, precompute)
    names = BASE_METRICS + (TOKEN_METRICS if r["token_metrics"] else ())
    for name in names:
        assert name in r["metrics"], f"DPOOutput.metrics has no {name!r} (TRL logs it); has {sorted(r['metrics'])}"
        _close(r["metrics"][name], r["trl_metrics"][name], f"metric {name}", case, precompute)


@pytest.mark.parametrize("precompute", PRECOMPUTE)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_parameter_gradients_match_trl(case, precompute):
    reason = _missing(case)
    if reason:
        pytest.skip(reason)
    r = _run(case, precompute)
    assert set(r["grads"]) == set(r["trl_grads"])
    for name, want in r["trl_grads"].items():
        got = r["grads"][name]
        atol = GRAD_ATOL_REL * max(want.abs().max().item(), 1e-30)
        torch.testing.assert_close(
            got, want, rtol=GRAD_RTOL, atol=atol,
            msg=lambda m: f"d loss / d {name} (case {case.id}, precompute={precompute}): {m}",
        )


@pytest.mark.parametrize("precompute", PRECOMPUTE)
def test_sft_reference_free_matches_trl_where_the_reference_does_not_enter(precompute):
    """``loss_type='sft'`` alone given no reference: TRL still runs its reference model (it logs the
    rewards against it), but the loss, its gradient and the log-prob, logits and token metrics do not
    depend on it and must match. (The rewards metrics are compared by the ``sft`` case above, which
    passes the reference as TRL has it.)"""
    case = next(c for c in CASES if c.id == "sft")
    reason = _missing(case)
    if reason:
        pytest.skip(reason)
    r = _run(case, precompute, reference_free=True)
    _close(r["loss"], r["trl_loss"], "loss", case, precompute)
    names = ("logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected")
    for name in names + (TOKEN_METRICS if r["token_metrics"] else ()):
        _close(r["metrics"][name], r["trl_metrics"][name], f"metric {name}", case, precompute)
    for name, want in r["trl_grads"].items():
        atol = GRAD_ATOL_REL * max(want.abs().max().item(), 1e-30)
        torch.testing.assert_close(r["grads"][name], want, rtol=GRAD_RTOL, atol=atol)


@pytest.mark.parametrize("precompute", PRECOMPUTE)
@pytest.mark.parametrize("case_id", ["sigmoid", "ipo", "sigmoid_norm", "sigmoid-wpo", "sigmoid-ld0.5", "mpo"])
def test_empty_prompt_matches_trl(case_id, precompute):
    """A pair whose prompt is empty: its first completion token has no prediction. TRL's ``ipo`` and
    ``sigmoid_norm`` still count it in the completion length they divide by (``completion_mask.sum()``,
    unshifted), while WPO, ``sft`` and LD-DPO use the scored tokens (``completion_mask[:, 1:]``)."""
    case = next(c for c in CASES if c.id == case_id)
    reason = _missing(case)
    if reason:
        pytest.skip(reason)
    r = _run(case, precompute, empty_prompt=True)
    _close(r["loss"], r["trl_loss"], "loss", case, precompute)
    for name in BASE_METRICS + (TOKEN_METRICS if r["token_metrics"] else ()):
        _close(r["metrics"][name], r["trl_metrics"][name], f"metric {name}", case, precompute)


@pytest.mark.parametrize("precompute", PRECOMPUTE)
def test_token_metrics_match_trl(precompute):
    """``entropy`` and ``mean_token_accuracy`` (``token_metrics=True``), TRL's definitions: entropy averaged
    over all completion tokens (chosen and rejected), top-1 accuracy over the chosen completion tokens."""
    case = CASES[0]
    reason = _missing(case, token_metrics=True)
    if reason:
        pytest.skip(reason)
    r = _run(case, precompute)
    assert 0.0 < r["trl_metrics"]["mean_token_accuracy"] < 1.0, "the batch should make accuracy non-trivial"
    for name in TOKEN_METRICS:
        assert name in r["metrics"], f"token_metrics=True gave no {name!r}; has {sorted(r['metrics'])}"
        _close(r["metrics"][name], r["trl_metrics"][name], f"metric {name}", case, precompute)


REFUSED = [
    # f-divergences only where TRL defines them (the beta log Z(x) term must cancel)
    *[_case(lt, id=f"{lt}-{f}", f_divergence_type=f)
      for lt, f in [("nca_pair", "forward_kl"), ("bco_pair", "js_divergence"), ("sppo_hard", "alpha_divergence"),
                    ("aot", "forward_kl"), ("aot_unpaired", "js_divergence"), ("apo_zero", "forward_kl"),
                    ("apo_down", "alpha_divergence")]],
    _case(["sigmoid", "bco_pair"], id="sigmoid+bco_pair-forward_kl", f_divergence_type="forward_kl"),
    _case("exo_pair", id="exo_pair-ls0", label_smoothing=0.0),  # EXO needs eps > 0
    _case("aot", id="aot-wpo", use_weighting=True),  # sorting would misalign the per-pair weights
    _case("aot_unpaired", id="aot_unpaired-wpo", use_weighting=True),
]


@pytest.mark.parametrize("case", REFUSED, ids=lambda c: c.id)
def test_what_trl_refuses_is_refused(case):
    """Option combinations TRL's DPOTrainer rejects at construction are errors here too, not silently
    computed: a ValueError (or NotImplementedError) from ``fused_dpo_loss``."""
    reason = _missing(case)
    if reason:
        pytest.skip(reason)
    with pytest.raises((ValueError, NotImplementedError)):
        _trainer(case, precompute=False)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 6, VOCAB, generator=g)
    labels = torch.randint(3, VOCAB, (4, 6), generator=g)
    labels[:, :2] = -100
    with pytest.raises((ValueError, NotImplementedError)):
        fused_dpo_loss(logits, labels, shift=True, ref_logps=torch.zeros(4), **case.our_kwargs())


def test_trl_sigmoid_ignores_label_smoothing():
    """TRL 1.16's ``sigmoid`` is plain DPO: it ignores ``label_smoothing`` (only robust, exo_pair, aot and
    aot_unpaired read it), while ``fused_dpo_loss(loss_type="sigmoid", label_smoothing=eps)`` is cDPO.
    A TRL config therefore maps to ``fused_dpo_loss`` WITHOUT label_smoothing for sigmoid (what an
    integration must do); this pins both facts."""
    case = _case("sigmoid", id="sigmoid-ls0.1-in-trl", label_smoothing=0.1)
    r = _run(case, False)
    plain = _run(CASES[0], False)  # sigmoid, no label smoothing on either side
    _close(plain["loss"], r["trl_loss"], "loss (TRL with label_smoothing=0.1)", case, False)
    assert not math.isclose(r["loss"], r["trl_loss"], rel_tol=1e-3), "ours with label_smoothing should be cDPO"


def test_the_batch_is_not_degenerate():
    """The tiny world exercises both signs of the margins, ragged lengths and a non-zero log-ratio."""
    r = _run(CASES[0], False)
    m = r["trl_metrics"]
    assert 0.0 < m["rewards/accuracies"] < 1.0
    assert abs(m["rewards/chosen"]) > 1e-3 and abs(m["rewards/rejected"]) > 1e-3
