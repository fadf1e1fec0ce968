"""IVT Eq. 2 against an independent per-token computation in plain Python on fixed log-prob tensors: the loss and
its gradient for every aggregation (token_mean = TRL dapo, seq_mean = TRL grpo, seq_sum_norm = TRL dr_grpo) and both
entropy aggregations."""

import math

import pytest
import torch

from agents.grpo.advantages import compute_advantages
from agents.grpo.losses import aggregate, grpo_loss, kl_penalty

# 2 groups x 3 trajectories, up to 4 generated tokens each (right-padded)
LOGP = [[-0.5, -1.0, -0.2, 0.0], [-2.0, -0.1, 0.0, 0.0], [-0.3, -0.3, -0.3, -0.3],
        [-1.5, 0.0, 0.0, 0.0], [-0.7, -0.9, 0.0, 0.0], [-0.05, -0.6, -1.1, 0.0]]
REF = [[-0.6, -0.8, -0.2, 9.0], [-1.0, -0.3, 9.0, 9.0], [-0.3, -0.5, -0.1, -0.2],
       [-1.2, 9.0, 9.0, 9.0], [-0.7, -1.4, 9.0, 9.0], [-0.1, -0.5, -1.0, 9.0]]
ENT = [[1.0, 2.0, 0.5, 7.0], [0.3, 0.4, 7.0, 7.0], [1.1, 1.2, 1.3, 1.4],
       [2.0, 7.0, 7.0, 7.0], [0.6, 0.8, 7.0, 7.0], [0.1, 0.2, 0.3, 7.0]]
LENS = [3, 2, 4, 1, 2, 3]
REWARDS = [[1.0, 0.0, 0.5], [0.2, 0.2, 0.2]]  # advantages (1, -1, 0), (0, 0, 0) with sample std, eps=0


def _tensors():
    logp = torch.tensor(LOGP, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[j < n for j in range(4)] for n in LENS])
    adv = compute_advantages("grpo", torch.tensor(REWARDS, dtype=torch.float64), eps=0.0).reshape(-1)
    return logp, mask, adv, torch.tensor(REF, dtype=torch.float64), torch.tensor(ENT, dtype=torch.float64)


def _reference_loss(adv, aggregation, beta, lam, kl="abs", entropy_aggregation="token_mean", norm_len=8):
    """Independent route: explicit loops over tokens of each trajectory."""
    terms = []  # per trajectory: list of per-token (pg, kl, ent)
    for i, n in enumerate(LENS):
        row = []
        for t in range(n):
            lp, rf, h = LOGP[i][t], REF[i][t], ENT[i][t]
            k = abs(lp - rf) if kl == "abs" else math.exp(rf - lp) - (rf - lp) - 1
            row.append((-lp * adv[i], k, h))
        terms.append(row)
    flat = [x for row in terms for x in row]
    tok = [sum(x[j] for x in flat) / len(flat) for j in range(3)]
    if aggregation == "token_mean":
        pg, k, h = tok
    elif aggregation == "seq_mean":
        per = [[sum(x[j] for x in row) / len(row) for j in range(3)] for row in terms]
        pg, k, h = (sum(p[j] for p in per) / len(per) for j in range(3))
    else:  # seq_sum_norm: sum over each trajectory's tokens / norm_len, mean over trajectories
        pg, k, h = (sum(x[j] for x in flat) / (len(terms) * norm_len) for j in range(3))
    if entropy_aggregation == "token_mean":
        h = tok[2]
    return pg + beta * k - lam * h, pg, k, h


def _reference_grads(adv, aggregation, beta, lam, kl, entropy_aggregation, norm_len=8):
    """d loss / d logp and d loss / d entropy per token, from the formulas: weight w_it of token t of trajectory i
    (token_mean 1/T, seq_mean 1/(B L_i), seq_sum_norm 1/(B norm_len)) times (-A_i + beta dKL/dlogp)."""
    B, T = len(LENS), sum(LENS)
    g_lp = [[0.0] * 4 for _ in LENS]
    g_h = [[0.0] * 4 for _ in LENS]
    for i, n in enumerate(LENS):
        w = {"token_mean": 1 / T, "seq_mean": 1 / (B * n), "seq_sum_norm": 1 / (B * norm_len)}[aggregation]
        w_h = 1 / T if entropy_aggregation == "token_mean" else w
        for t in range(n):
            lp, rf = LOGP[i][t], REF[i][t]
            # d|x|/dx: sign(x), 0 at x = 0 (torch's subgradient; tokens 0,2 and 2,0 have logp == ref)
            dk = float((lp > rf) - (lp < rf)) if kl == "abs" else 1.0 - math.exp(rf - lp)
            g_lp[i][t] = w * (-adv[i] + beta * dk)
            g_h[i][t] = -lam * w_h
    return torch.tensor(g_lp, dtype=torch.float64), torch.tensor(g_h, dtype=torch.float64)


@pytest.mark.parametrize("entropy_aggregation", ["token_mean", "loss"])
@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean", "seq_sum_norm"])
@pytest.mark.parametrize("kl", ["abs", "k3"])
def test_gradient_equals_independent_computation(aggregation, kl, entropy_aggregation):
    logp, mask, _, ref, ent = _tensors()
    adv = torch.tensor([1.0, -1.0, 0.5, -0.25, 0.0, 2.0], dtype=torch.float64)  # all rows carry signal
    ent = ent.clone().requires_grad_(True)
    out = grpo_loss(logp, mask, adv, ref_logprobs=ref, entropy=ent, beta=0.04, entropy_coef=0.01, kl_estimator=kl,
                    aggregation=aggregation, norm_len=8, entropy_aggregation=entropy_aggregation)
    loss, pg, k, h = _reference_loss(adv.tolist(), aggregation, 0.04, 0.01, kl, entropy_aggregation)
    assert out.loss.item() == pytest.approx(loss, abs=1e-12)
    assert (out.pg, out.kl, out.entropy) == pytest.approx((pg, k, h), abs=1e-12)
    out.loss.backward()
    g_lp, g_h = _reference_grads(adv.tolist(), aggregation, 0.04, 0.01, kl, entropy_aggregation)
    assert torch.allclose(logp.grad, g_lp, atol=1e-15) and torch.allclose(ent.grad, g_h, atol=1e-15)


def test_entropy_bonus_keeps_its_strength_under_seq_sum_norm():
    # TRL: the entropy bonus is the mean per-token entropy for every loss type; aggregated like a seq_sum_norm loss
    # it would shrink by mean length / norm_len (here 2.5 / 8)
    logp, mask, adv, ref, ent = _tensors()
    kw = dict(beta=0.0, entropy_coef=1.0, aggregation="seq_sum_norm", norm_len=8)
    tok = grpo_loss(logp, mask, adv, entropy=ent, **kw).entropy
    as_loss = grpo_loss(logp, mask, adv, entropy=ent, entropy_aggregation="loss", **kw).entropy
    assert tok == pytest.approx(float(ent[mask].mean()))
    assert as_loss == pytest.approx(tok * (sum(LENS) / len(LENS)) / 8)


def test_token_mean_by_hand_and_gradient():
    logp, mask, adv, ref, ent = _tensors()
    out = grpo_loss(logp, mask, adv, beta=0.0, entropy_coef=0.0)
    # only trajectories 0 (A=+1, 3 tokens) and 1 (A=-1, 2 tokens) carry signal; 15 tokens in all
    assert out.loss.item() == pytest.approx(-((-0.5 - 1.0 - 0.2) - (-2.0 - 0.1)) / 15)
    out.loss.backward()
    g = logp.grad
    assert torch.allclose(g[0, :3], torch.full((3,), -1 / 15, dtype=torch.float64))
    assert torch.allclose(g[1, :2], torch.full((2,), 1 / 15, dtype=torch.float64))
    assert (g[2:] == 0).all() and g[0, 3] == 0 and (g[1, 2:] == 0).all()  # padding and A=0 rows get nothing


def test_masked_positions_may_hold_nan():
    logp, mask, adv, ref, ent = _tensors()
    bad = logp.detach().clone()
    bad[~mask] = float("nan")
    ref2 = ref.clone()
    ref2[~mask] = float("nan")
    a = grpo_loss(bad, mask, adv, ref_logprobs=ref2, entropy=ent).loss
    b = grpo_loss(logp.detach(), mask, adv, ref_logprobs=ref, entropy=ent).loss
    assert torch.isfinite(a) and a.item() == pytest.approx(b.item())


def test_clipped_ratio_first_update_matches_reinforce_gradient():
    logp, mask, adv, ref, ent = _tensors()
    grpo_loss(logp, mask, adv, ref_logprobs=ref, entropy=ent).loss.backward()
    g_reinforce = logp.grad.clone()
    logp.grad = None
    out = grpo_loss(logp, mask, adv, ref_logprobs=ref, entropy=ent, old_logprobs=logp.detach(), clip_eps=0.2)
    out.loss.backward()
    assert torch.allclose(logp.grad, g_reinforce) and out.clip_frac == 0.0


def test_clipped_ratio_by_hand():
    # one trajectory, two tokens, A = +1: ratios e^0.5 = 1.65 (clipped to 1.2) and e^-0.1 = 0.905 (not clipped)
    logp = torch.tensor([[0.0, -0.1]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-0.5, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True]])
    out = grpo_loss(logp, mask, torch.tensor([1.0]), old_logprobs=old, clip_eps=0.2, beta=0.0, entropy_coef=0.0)
    assert out.loss.item() == pytest.approx(-(1.2 + math.exp(-0.1)) / 2)
    assert out.clip_frac == 0.5
    out.loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1].item() == pytest.approx(-math.exp(-0.1) / 2)


def test_kl_estimators_by_hand():
    lp, rf = torch.tensor([-1.0]), torch.tensor([-2.0])
    assert kl_penalty(lp, rf, "abs").item() == pytest.approx(1.0)
    assert kl_penalty(lp, rf, "k3").item() == pytest.approx(math.exp(-1.0) + 1.0 - 1.0)
    assert kl_penalty(lp, lp, "k3").item() == 0.0
    with pytest.raises(ValueError, match="KL estimator"):
        kl_penalty(lp, rf, "k9")


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean", "seq_sum_norm"])
def test_micro_batches_add_up_to_the_full_batch(aggregation):
    logp, mask, adv, ref, ent = _tensors()
    kw = dict(beta=0.04, entropy_coef=0.01, aggregation=aggregation, norm_len=8)
    full = grpo_loss(logp, mask, adv, ref_logprobs=ref, entropy=ent, **kw).loss
    full.backward()
    g_full = logp.grad.clone()
    logp.grad = None
    tot_tok, tot_seq = int(mask.sum()), mask.shape[0]
    acc = 0.0
    for sl in (slice(0, 2), slice(2, 5), slice(5, 6)):
        part = grpo_loss(logp[sl], mask[sl], adv[sl], ref_logprobs=ref[sl], entropy=ent[sl],
                         num_tokens=tot_tok, num_seqs=tot_seq, **kw).loss
        part.backward()
        acc += part.item()
    assert acc == pytest.approx(full.item(), abs=1e-12)
    assert torch.allclose(logp.grad, g_full)


def test_argument_errors():
    logp, mask, adv, ref, ent = _tensors()
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(logp, mask, adv, beta=0.04)
    with pytest.raises(ValueError, match="old_logprobs"):
        grpo_loss(logp, mask, adv, ref_logprobs=ref, clip_eps=0.2)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(logp, mask, adv[:3], ref_logprobs=ref)
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(logp, mask, "mean")
    with pytest.raises(ValueError, match="norm_len"):
        aggregate(logp, mask, "seq_sum_norm")
