"""The VAE and the prefix sources: mean pooling, the ELBO, save/load, the model check, shapes
and norms of every prefix source, the prefix forms and the prefix-health check.

Run:  python -m pytest tests/test_palette.py -q
"""
import functools
import json

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from diagnostics import is_broken, prefix_health
from common import UserError
from model import (PREFIX_SOURCES, NoisePrefix, NoPrefix, PaletteVAE, PrefixSource, VAEPrefix, embedding_fingerprint,
                   load_vae, make_prefix_source, prefix_class, save_vae)
from train_vae import mean_pooled_embeddings

from conftest import tiny_toy_model


def unit_E(d):
    """A one-row embedding matrix of norm 1: sources scale their prefixes to its norm."""
    return torch.full((1, d), d ** -0.5)


def test_mean_pooled_h_by_hand():
    E = torch.arange(12.0).view(4, 3)              # token i -> [3i, 3i+1, 3i+2]
    h = mean_pooled_embeddings(E, [[0, 2], [1, 1, 3]])
    assert torch.equal(h[0], torch.tensor([3.0, 4.0, 5.0]))          # mean of rows 0 and 2
    assert torch.allclose(h[1], torch.tensor([5.0, 6.0, 7.0]))        # (3 + 3 + 9) / 3 = 5


def _corpus(n=512, d=24, seed=0):
    """Three clusters in embedding space, standing in for three domains."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(3, d, generator=g) * 2
    labels = torch.randint(0, 3, (n,), generator=g)
    return centres[labels] + 0.3 * torch.randn(n, d, generator=g), labels


def test_elbo_falls_and_kl_matches_closed_form():
    torch.manual_seed(0)
    h, _ = _corpus()
    E = torch.randn(50, h.shape[1])
    vae = PaletteVAE(h.shape[1], latent_dim=4, hidden_dim=64)
    vae.set_statistics(h, E)
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        loss, recon, kl = vae(h, 0.1, torch.randn(len(h), 4))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20
    # the KL term against torch.distributions' closed form
    mu, logvar = vae.encode(h)
    expected = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(-1).mean()
    _, _, kl = vae(h, 0.1, torch.randn(len(h), 4))
    torch.testing.assert_close(kl, expected, atol=1e-5, rtol=1e-5)


def _trained_vae(tmp_path, E):
    h, labels = _corpus(d=E.shape[1])
    vae = PaletteVAE(E.shape[1], latent_dim=4, hidden_dim=32)
    vae.set_statistics(h, E)
    with torch.no_grad():
        mu, _ = vae.encode(h)
    domains = {name: {"mean": mu[labels == i].mean(0).tolist(),
                      "cov": torch.cov(mu[labels == i].T).tolist()}
               for i, name in enumerate(["math", "code", "qa"])}
    save_vae(vae, tmp_path / "vae", {"beta": 0.1, "model": "test", "domains": domains,
                                     "fingerprint": embedding_fingerprint(E)})
    return vae


def test_save_load_round_trip_exactly(tmp_path):
    E = torch.randn(80, 24)
    vae = _trained_vae(tmp_path, E)
    loaded, meta = load_vae(tmp_path / "vae", E)
    for (k, a), (_, b) in zip(vae.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    assert meta["domains"].keys() == {"math", "code", "qa"}


def test_vae_for_another_model_is_refused(tmp_path):
    E = torch.randn(80, 24)
    _trained_vae(tmp_path, E)
    with pytest.raises(UserError, match="embeddings of size 24.*this model's are of size 32"):
        load_vae(tmp_path / "vae", torch.randn(80, 32))
    with pytest.raises(UserError, match="trained for another model"):
        load_vae(tmp_path / "vae", torch.randn(80, 24))
    # a fine-tuned descendant (embeddings moved a little) is still accepted
    load_vae(tmp_path / "vae", E + 0.05 * torch.randn_like(E))
    with pytest.raises(UserError, match="no vae.json"):
        load_vae(tmp_path / "missing", E)


@pytest.mark.parametrize("name", list(PREFIX_SOURCES))
@pytest.mark.parametrize("tie", [False, True])
def test_every_prefix_source_keeps_its_contract(tmp_path, name, tie):
    """What every source of the registry promises (a new one joins with no edit here): n prefixes
    of rows(L) rows, vectors of the policy's width or token ids, None for L = 0, the same draws from
    the same generator and fresh ones for every row; --tie repeats one draw; its declared norm."""
    from toy.tokenizer import build_tokenizer
    E = torch.randn(80, 24) * 0.7
    _trained_vae(tmp_path, E)
    cls = prefix_class(name)
    if tie and not cls.tieable:
        return                                            # refused at start-up (check_prefix_sources)
    source = make_prefix_source(name, E, tokenizer=build_tokenizer(), vae=tmp_path / "vae", tie=tie)
    p = source.sample(5, 3, generator=torch.Generator().manual_seed(0))
    assert source.sample(5, 0) is None
    if source.rows(3) == 0:
        assert p is None
        return
    assert p.shape[:2] == (5, source.rows(3)) and (p.shape[2:] == (24,) if p.is_floating_point() else p.dim() == 2)
    assert torch.equal(p, source.sample(5, 3, generator=torch.Generator().manual_seed(0)))      # seeded
    assert not torch.equal(p[0], p[1])                                                          # rows differ
    if p.is_floating_point():
        assert torch.isfinite(p).all()
        if tie and name != "random_decoder":             # one draw repeated L times
            assert torch.allclose(p[:, 0], p[:, 2])
        elif not tie:
            assert not torch.allclose(p[:, 0], p[:, 2])
    norms = p.norm(dim=-1) if p.is_floating_point() else None
    if cls.norm == "token":                              # at the mean token-embedding norm
        assert torch.allclose(norms, E.norm(dim=-1).mean().expand_as(norms), rtol=1e-4)
    elif cls.norm == "table":                            # entries like the table's: sqrt(d (var + mean^2))
        expected = (24 * (E.var() + E.mean() ** 2)).sqrt()
        assert abs(norms.mean() / expected - 1) < 0.25


def test_none_source_and_a_vae_source_without_a_vae(tmp_path):
    E = torch.randn(80, 24)
    assert make_prefix_source("none", E).sample(4, 8) is None
    assert make_prefix_source("noise", E).sample(4, 0) is None
    with pytest.raises(UserError, match="no vae.json"):
        make_prefix_source("vae", E)


def test_domain_region_samples_near_its_mean(tmp_path):
    E = torch.randn(80, 24)
    _trained_vae(tmp_path, E)
    source = make_prefix_source("vae", E, vae=tmp_path / "vae", region="code")
    z = source.region_mean + torch.randn(4000, 4) @ source.region_chol.T
    loaded, meta = load_vae(tmp_path / "vae", E)
    torch.testing.assert_close(z.mean(0), torch.tensor(meta["domains"]["code"]["mean"]),
                               atol=0.05, rtol=0)
    with pytest.raises(UserError, match="no latent region 'poetry'"):
        make_prefix_source("vae", E, vae=tmp_path / "vae", region="poetry")


# -- prefix forms ----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _trained_over_a_common_mean(d=24):
    """VAE weights trained on a corpus that shares one large mean, as real mean-pooled embeddings
    do (every h is mostly the average token), with three small clusters around it."""
    h, _ = _corpus(n=512, d=d)
    h = 3.0 * torch.randn(d, generator=torch.Generator().manual_seed(1)) + 0.1 * h   # (512, d)
    torch.manual_seed(0)
    vae = PaletteVAE(d, latent_dim=4, hidden_dim=32)
    vae.set_statistics(h, torch.randn(80, d))
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    for _ in range(200):
        loss, _, _ = vae(h, 0.1, torch.randn(len(h), 4))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return vae.state_dict()


def _vae_over_a_common_mean(form, d=24):
    vae = PaletteVAE(d, latent_dim=4, hidden_dim=32, prefix_form=form)
    vae.load_state_dict(_trained_over_a_common_mean(d))
    return vae.eval().requires_grad_(False)


def test_prefix_forms_by_hand():
    z = torch.randn(5, 4)
    forms = {form: _vae_over_a_common_mean(form) for form in ("paper", "rescaled", "centred")}
    vae = forms["paper"]
    h_hat = vae.decode(z)                                                        # (5, d)
    torch.testing.assert_close(forms["paper"].prefix(z), h_hat)
    rescaled = h_hat / h_hat.norm(dim=-1, keepdim=True) * vae.token_norm
    torch.testing.assert_close(forms["rescaled"].prefix(z), rescaled)
    deviation = h_hat - vae.h_mean
    centred = deviation / deviation.norm(dim=-1, keepdim=True) * vae.token_norm
    torch.testing.assert_close(forms["centred"].prefix(z), centred)
    with pytest.raises(UserError, match="unknown prefix form 'whitened'"):
        PaletteVAE(24, prefix_form="whitened")
    for form, vae in forms.items():                 # prefix_scale multiplies the prefix, nothing else
        vae.prefix_scale = 0.25
        torch.testing.assert_close(vae.prefix(z), 0.25 * {"paper": h_hat, "rescaled": rescaled,
                                                          "centred": centred}[form])


def test_vae_json_keeps_the_prefix_scale_and_refuses_a_bad_one(tmp_path):
    E = torch.randn(80, 24)
    vae = _vae_over_a_common_mean("centred")
    vae.prefix_scale = 0.5
    save_vae(vae, tmp_path, {"beta": 0.1, "model": "test", "fingerprint": embedding_fingerprint(E)})
    meta = json.loads((tmp_path / "vae.json").read_text())
    assert meta["prefix_scale"] == 0.5 and load_vae(tmp_path, E)[0].prefix_scale == 0.5
    for bad in (0, -1, "half", True):
        (tmp_path / "vae.json").write_text(json.dumps(dict(meta, prefix_scale=bad)))
        with pytest.raises(UserError, match="prefix_scale is .*expected a positive number"):
            load_vae(tmp_path, E)


def test_vae_json_records_the_form_and_old_directories_load_rescaled(tmp_path):
    E = torch.randn(80, 24)
    vae = _vae_over_a_common_mean("paper")
    save_vae(vae, tmp_path, {"beta": 0.1, "model": "test", "fingerprint": embedding_fingerprint(E)})
    meta = json.loads((tmp_path / "vae.json").read_text())
    assert meta["prefix_form"] == "paper"
    assert load_vae(tmp_path, E)[0].prefix_form == "paper"
    del meta["prefix_form"]                         # a directory written before forms existed
    (tmp_path / "vae.json").write_text(json.dumps(meta))
    old, _ = load_vae(tmp_path, E)
    assert old.prefix_form == "rescaled"
    z = torch.randn(3, 4)
    h_hat = vae.decode(z)
    torch.testing.assert_close(old.prefix(z), h_hat / h_hat.norm(dim=-1, keepdim=True) * vae.token_norm)


# -- the prefix-health check -----------------------------------------------------------------------

def test_health_check_warns_on_a_collapsed_vae_and_not_on_a_healthy_one():
    collapsed, lines = prefix_health(VAEPrefix(unit_E(24), vae=_vae_over_a_common_mean("rescaled")))
    assert collapsed["prefix_pairwise_cos"] > 0.9 and collapsed["prefix_cos_to_corpus_mean"] > 0.9
    warning = [line for line in lines if line.startswith("warning")]
    assert len(warning) == 1 and "collapse to one direction" in warning[0]
    assert "--prefix-form centred" in warning[0]                    # says what to do
    for source in (VAEPrefix(unit_E(24), vae=_vae_over_a_common_mean("centred")), NoisePrefix(unit_E(24))):
        healthy, lines = prefix_health(source)
        assert healthy["prefix_pairwise_cos"] < 0.5
        assert not any(line.startswith("warning") for line in lines), lines
    assert prefix_health(NoPrefix(unit_E(24))) == ({}, [])       # source none: nothing to check


def test_a_collapsed_centred_vae_is_not_told_to_become_centred():
    """A centred VAE whose decoder ignores z (every prefix is one vector) collapses too; the
    warning then points at the VAE's training, not at the form it already has."""
    vae = _vae_over_a_common_mean("centred")
    last = vae.decoder[-1]
    last.weight.zero_()
    last.bias.copy_(torch.linspace(-1.0, 1.0, last.bias.numel()))
    health, lines = prefix_health(VAEPrefix(unit_E(24), vae=vae))
    assert health["prefix_pairwise_cos"] > 0.99
    warning = [line for line in lines if line.startswith("warning")]
    assert len(warning) == 1 and "collapse to one direction" in warning[0]
    assert "--prefix-form" not in warning[0] and "--beta" in warning[0], warning[0]


def test_is_broken():
    assert is_broken([], "")
    assert is_broken([5, 6, 5], " \n\n ")                         # blank lines
    assert is_broken([7, 3] * 8, "Z\nZ\nZ\nZ\nZ\nZ\nZ\nZ\n")       # one token and a newline, repeated
    assert is_broken([7, 8, 3] * 16, "Zar\nZar\nZar\nZar\nZar\nZar\nZar\nZar\n")   # a loop of 3 tokens
    assert not is_broken([9], "5")                                  # short, but an answer
    assert not is_broken(list(range(20)) * 2, "a long answer, said twice")
    assert not is_broken([4, 5, 6, 7, 8, 4, 5, 6, 7, 8], "47+38=85\nanswer: 85")


class _SamePrefix(PrefixSource):
    """Every draw is the same vector: answers can never change between two draws."""
    name = "same"

    def _draw(self, n, L, generator):
        return torch.ones(n, L, self.dim)


def test_health_check_on_answers_counts_changes_and_broken_outputs():
    model, tokenizer = tiny_toy_model()
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in ("12+34=?\n", "5+6=?\n")]
    health, lines = prefix_health(_SamePrefix(unit_E(32)), model, prompts, tokenizer, max_new_tokens=12)
    assert health["frac_answers_change"] == 0.0
    assert 0.0 <= health["frac_broken"] <= 1.0
    # a policy that says one token forever: every answer is broken, and the check says so
    with torch.no_grad():
        model.model.norm.weight.zero_()             # all logits 0: greedy picks token 0 each step
    health, lines = prefix_health(NoisePrefix(unit_E(32)), model, prompts, tokenizer, max_new_tokens=12)
    assert health["frac_broken"] == 1.0 and health["frac_answers_change"] == 0.0
    assert any(line.startswith("warning") and "broken" in line for line in lines)
    assert model.training                           # the check leaves the mode as it found it


def test_rsp_prefixes_match_the_embedding_tables_moments_and_are_fresh(tmp_path):
    """RSP: entries drawn from N(mean, var) of the embedding table's entries, a new draw for every
    prefix, untrained; it runs through every stage like any source (tests/test_pairwise.py)."""
    g = torch.Generator().manual_seed(0)
    E = 0.3 + 0.05 * torch.randn(500, 48, generator=g)            # a table off zero, as real ones are
    source = make_prefix_source("rsp", E)
    p = source.sample(400, 2, generator=torch.Generator().manual_seed(1))            # (400, 2, 48)
    assert p.shape == (400, 2, 48) and p.dtype == torch.float32
    assert abs(p.mean().item() - E.mean().item()) < 0.005
    assert abs(p.std().item() - E.std().item()) < 0.005
    assert not torch.allclose(p[:, 0], p[:, 1]) and not torch.allclose(p[0], p[1])   # every vector fresh
    tied = make_prefix_source("rsp", E, tie=True).sample(3, 2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(tied[:, 0], tied[:, 1])
    assert torch.equal(source.sample(400, 2, generator=torch.Generator().manual_seed(1)), p)   # seeded
