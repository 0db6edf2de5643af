"""A tiny world for the integration tests: a word-level tokenizer, ragged preference rows and small
causal LMs built from configs (nothing downloaded), plus helpers to run a trainer for a few steps.

Imported by the test files of this folder as ``tiny_world`` (pytest puts the folder on sys.path);
each imports ``quiet_and_single_threaded``, a module-scoped autouse fixture. (No conftest.py here: a
second module named ``conftest`` would shadow ``tests/conftest.py`` for ``from conftest import``.)"""
from __future__ import annotations

import copy
import tempfile
import warnings

import pytest
import torch
from quiet_training import quiet_single_threaded

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
datasets = pytest.importorskip("datasets")

VOCAB = 101  # not a power of two
# (prompt, chosen, rejected) lengths in words: ragged, chosen longer or shorter, one-word completions
LENGTHS = [(3, 5, 2), (6, 2, 4), (2, 7, 7), (4, 1, 3), (5, 4, 6), (1, 3, 1), (4, 2, 5), (3, 3, 2)]


def make_tokenizer():
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({f"w{i}": i + 3 for i in range(VOCAB - 3)})
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")


def make_rows(seed: int = 7, lengths=LENGTHS) -> list[dict]:
    g = torch.Generator().manual_seed(seed)

    def words(n):
        return " ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 3, (n,), generator=g))

    return [{"prompt": words(p), "chosen": " " + words(c), "rejected": " " + words(r)} for p, c, r in lengths]


_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=None,
               attn_implementation="eager")


def make_config(arch: str = "llama"):
    if arch == "llama":
        return transformers.LlamaConfig(num_hidden_layers=2, initializer_range=0.1, **_COMMON)
    if arch == "mixtral":  # MoE: TRL adds router_aux_loss_coef * aux_loss and logs aux_loss
        return transformers.MixtralConfig(num_hidden_layers=1, num_local_experts=4, num_experts_per_tok=2,
                                          router_aux_loss_coef=0.05, initializer_range=0.1, **_COMMON)
    if arch == "gemma2":  # final logit soft-capping, small enough to bite
        return transformers.Gemma2Config(num_hidden_layers=1, head_dim=8, final_logit_softcapping=2.0,
                                         query_pre_attn_scalar=8, sliding_window=16, initializer_range=0.1,
                                         **_COMMON)
    if arch == "cohere":  # logits scaled by logit_scale
        return transformers.CohereConfig(num_hidden_layers=1, logit_scale=0.5, initializer_range=0.1, **_COMMON)
    raise ValueError(arch)


def make_models(arch: str = "llama", seed: int = 0, perturb: float = 0.1):
    """(policy, reference): the policy is the reference moved a little, so log-ratios start non-zero."""
    config = make_config(arch)
    torch.manual_seed(seed)
    ref = transformers.AutoModelForCausalLM.from_config(config).float()
    policy = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * perturb)
    return policy, ref


def dpo_config(**kwargs):
    """A DPOConfig for a few CPU steps. Plain SGD: its updates are linear in the gradients, so a
    weight difference measures a gradient difference (AdamW divides a near-zero gradient by its own
    RMS and turns float32 noise into an lr-sized step)."""
    import trl

    base = dict(output_dir=tempfile.mkdtemp(prefix="dpo_kernels_integrations_"), report_to=[], use_cpu=True,
                bf16=False, fp16=False, gradient_checkpointing=False, per_device_train_batch_size=4,
                per_device_eval_batch_size=4, max_steps=3, logging_steps=1, learning_rate=0.1, optim="sgd",
                save_strategy="no", disable_tqdm=True, seed=0, lr_scheduler_type="constant")
    base.update(kwargs)
    return trl.DPOConfig(**base)


def build_trainer(cls, *, policy, ref=None, rows=None, eval_rows=None, config=None, **extra):
    """A trainer on deep copies of the models (each trainer gets its own), fresh datasets."""
    rows = make_rows() if rows is None else rows
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(
            model=copy.deepcopy(policy), ref_model=None if ref is None else copy.deepcopy(ref),
            args=config or dpo_config(), train_dataset=datasets.Dataset.from_list(rows),
            eval_dataset=None if eval_rows is None else datasets.Dataset.from_list(eval_rows),
            processing_class=make_tokenizer(), **extra,
        )


def train(trainer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return trainer


@pytest.fixture(scope="module", autouse=True)
def quiet_and_single_threaded():
    """Tiny tensors: intra-op threads only add synchronisation (and stall when the machine is busy)."""
    with quiet_single_threaded():
        yield
