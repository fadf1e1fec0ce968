"""BCConfig.train_only_tokens (issue 14): only the embedding rows of the given text's tokens move."""

import pytest
import torch

from agents.bc import train
from agents.bc.config import BCConfig
from agents.synthesis import SynthesizeConfig


def _cfg(out, **kw):
    synth = SynthesizeConfig(env="IVT-Synthetic-v0", steps=1, student="scripted", verbosity=0, batch_size=8,
                             progress=False)
    base = dict(init_from="tiny", full_finetune=True, threads=1, data="online", synth=synth, lr=1e-2,
                batch_size=4, grad_accum=1, max_steps=2, warmup_ratio=0.0, eval_at_start=False, eval_limit=2,
                eval_batch=2, eval_max_new_tokens=4, progress=False, out=str(out), log_every=1)
    base.update(kw)
    return BCConfig(**base)


def test_only_the_rows_of_the_text_tokens_change(tmp_path):
    """Two AdamW steps on teacher data that writes " Move" and " fits" (its words): the rows of exactly the tokens
    of " Move fits" differ from the start model's, and no other weight changed by a single bit."""
    from agents.policies.vlm import VLMPolicy

    assert train(_cfg(tmp_path / "run", train_only_tokens=" Move fits"))["steps"] == 2
    base = VLMPolicy.from_pretrained(str(tmp_path / "run" / "base"))
    final = VLMPolicy.from_pretrained(str(tmp_path / "run" / "final"))
    ids = base.tokenizer(" Move fits", add_special_tokens=False)["input_ids"]
    assert len(ids) == 2 and base.tokenizer.decode(ids) == " Move fits"  # one token per word
    emb0 = base.hf_model.get_input_embeddings().weight
    emb1 = final.hf_model.get_input_embeddings().weight
    changed = sorted(int(i) for i in ((emb1 - emb0).abs().sum(dim=1) > 0).nonzero().flatten())
    assert changed == sorted(ids)
    p0 = dict(base.hf_model.named_parameters())
    others = [n for n, p in final.hf_model.named_parameters() if p is not final.hf_model.get_input_embeddings().weight]
    assert others and all(torch.equal(final.hf_model.get_parameter(n), p0[n]) for n in others)


def test_train_only_tokens_needs_full_finetune(tmp_path):
    with pytest.raises(ValueError, match="train_only_tokens needs full_finetune"):
        train(_cfg(tmp_path / "run", train_only_tokens=" It", full_finetune=False))
