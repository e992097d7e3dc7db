"""The keyed sampler (model.sample_next with model.keyed_uniform) draws each token at its probability,
tail tokens included, and never one of probability 0; rl.py gives every rollout of a group its own
sampling key.

Run:  python -m pytest tests/test_sampling.py -q
"""
import math

import torch

from model import keyed_uniform, sample_next

M, C = 2**32 - 1, 0x45D9F3B
C_INV = pow(C, -1, 2**32)


def unmix(y):
    """The inverse of keyed_uniform's 32-bit hash mix (each of its steps is a bijection)."""
    for step in range(3):
        y ^= y >> 16
        y = (y * C_INV) & M if step < 2 else y
    return y


def keys_with_words(words, t, v):
    """Keys whose hash word for token v at step t is each of `words` (32-bit ints): keyed_uniform
    run backwards, so a test can put a token's noise where it chooses."""
    rows = [(unmix(w) - 0x9E3779B9 * v) & M for w in words]
    return torch.tensor([unmix(unmix(row) ^ t) for row in rows])


def test_tail_tokens_are_drawn_at_their_probability():
    """A vocabulary with a long tail (10,000 tokens at 1e-7 to 1e-6 of the top one). A tail token is
    drawn when its noise u is within about p / p_top of 1, once in millions of draws, so the test takes
    the keys whose u for a chosen token lies in the top 512 / 2^32 of (0, 1) (all 512 of them), where
    the exponential race gives it the exact chance exp(-q (1 - p) / p), q = -log u. The counts of
    four such tokens, from 1e-7 to 1e-6, against those chances (chi-square, 4 degrees of freedom).
    24-bit noise drew them about half as often (it rounded the top u to 1, and that token lost)."""
    V, S, t = 10001, 512, 5
    logits = torch.cat([torch.zeros(1), torch.logspace(-7, -6, V - 1, dtype=torch.float64).log().float()])
    p = logits.double().softmax(-1)
    chi2 = 0.0
    for v in (1, 3000, 7000, V - 1):
        keys = keys_with_words(range(M + 1 - S, M + 1), t, v)                                  # (S,)
        u = keyed_uniform(keys, t, V)[:, v]
        assert (u >= 1 - S / 2**32).all()             # the keys put it there
        lam, delta = float((1 - p[v]) / p[v]), S / 2**32         # q is uniform on (0, delta) to 1e-7
        expected = S * (1 - math.exp(-delta * lam)) / (delta * lam)
        drawn = (sample_next(logits.expand(S, V), keys=keys, t=t) == v).sum().item()
        chi2 += (drawn - expected) ** 2 / expected + (drawn - expected) ** 2 / (S - expected)
    assert chi2 < 18.5                                                 # p = 0.001 at 4 degrees of freedom


def test_no_key_draws_a_token_outside_top_p():
    """Top-p 0.5 keeps token 0 alone; keys chosen so that each excluded token's noise, or the kept
    one's, takes the extreme hash words (u nearest 0 and 1) never draw an excluded token. Key 2962 at
    t 0 is the reported case: 24-bit noise gave token 3498 u = 1, q = -0, and p / q = 0 / -0 = NaN won."""
    V = 3500
    logits = torch.full((V,), -50.0)
    logits[0], logits[1:4] = 0.0, float("-inf")             # 1..3: a logit of -inf, also probability 0
    assert sample_next(logits[None], top_p=0.5, keys=torch.tensor([2962]), t=0).item() == 0
    words = [0, 1, 2, 2**31, *range(M + 1 - 300, M + 1)]
    for v in (0, 1, 5, V - 2):
        keys = keys_with_words(words, 0, v)                                                  # (303,)
        draw = lambda top_p: sample_next(logits.expand(len(keys), V), top_p=top_p, keys=keys, t=0)
        assert (draw(0.5) == 0).all()
        assert not torch.isin(draw(1.0), torch.tensor([1, 2, 3])).any()
    draws = sample_next(logits[:8].expand(20000, 8), top_p=0.5, keys=torch.arange(20000), t=5)
    assert (draws == 0).all()


def test_the_rollouts_of_a_group_draw_different_noise():
    """rl.rollout gives each of a group's G rollouts its own sampling key: from one prompt, without a
    prefix, the G completions differ (with one key for the group they would all be equal)."""
    import rl
    from conftest import tiny_toy_model
    model, _ = tiny_toy_model(std=0.5)
    args = rl.parser.parse_args(["--data", "-", "--model", "-", "--out", "-", "--schedule", "none",
                                 "--group-size", "8", "--max-new-tokens", "6"])
    r = rl.rollout(model, None, [{"prompt_ids": [5, 6, 7]}] * 2, 0, torch.zeros(2, dtype=torch.long), 0, 3, args,
                   eos=-1)                                                                   # 2 groups of 8
    assert len({tuple(c) for c in r.completions[:8]}) >= 6 and r.completions[:8] != r.completions[8:]
