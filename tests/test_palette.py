"""The VAE and the prefix sources: mean pooling, the ELBO, save/load, the model check, and shapes
and norms of every prefix source.

Run:  python -m pytest tests/test_palette.py -q
"""
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from common import UserError
from model import (PaletteVAE, embedding_fingerprint, load_vae, make_prefix_source,
                   mean_pooled_embeddings, save_vae)


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
        loss, recon, kl = vae(h, beta=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-20:]) / 20 < 0.5 * sum(losses[:20]) / 20
    # the KL term against torch.distributions' closed form
    mu, logvar = vae.encode(h)
    expected = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(-1).mean()
    _, _, kl = vae(h, beta=0.1)
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
    with pytest.raises(UserError, match="embeddings of size 24.*this model's are 32"):
        load_vae(tmp_path / "vae", torch.randn(80, 32))
    with pytest.raises(UserError, match="trained for another model"):
        load_vae(tmp_path / "vae", torch.randn(80, 24))
    # a fine-tuned descendant (embeddings moved a little) is still accepted
    load_vae(tmp_path / "vae", E + 0.05 * torch.randn_like(E))
    with pytest.raises(UserError, match="no vae.json"):
        load_vae(tmp_path / "missing", E)


@pytest.mark.parametrize("name", ["vae", "noise", "random_decoder"])
@pytest.mark.parametrize("tie", [False, True])
def test_prefix_sources_shape_and_norm(tmp_path, name, tie):
    E = torch.randn(80, 24) * 0.7
    _trained_vae(tmp_path, E)
    source = make_prefix_source(name, E, vae_dir=tmp_path / "vae", tie=tie)
    p = source.sample(5, 3, generator=torch.Generator().manual_seed(0))
    assert p.shape == (5, 3, 24)
    token_norms = E.norm(dim=-1)
    norms = p.norm(dim=-1)
    assert (norms > token_norms.min() * 0.9).all() and (norms < token_norms.max() * 1.1).all()
    assert torch.allclose(norms, token_norms.mean().expand_as(norms), rtol=1e-4)
    if tie and name != "random_decoder":        # one draw repeated L times
        assert torch.allclose(p[:, 0], p[:, 2])
    elif not tie:
        assert not torch.allclose(p[:, 0], p[:, 2])
    assert not torch.allclose(p[0], p[1])       # rows get their own draws
    again = source.sample(5, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(p, again)                # seeded


def test_none_source_and_bad_L(tmp_path):
    E = torch.randn(80, 24)
    assert make_prefix_source("none", E).sample(4, 8) is None
    assert make_prefix_source("noise", E).sample(4, 0) is None
    with pytest.raises(UserError, match="L must be >= 0"):
        make_prefix_source("noise", E).sample(4, -1)
    with pytest.raises(UserError, match="needs --vae"):
        make_prefix_source("vae", E)
    with pytest.raises(UserError, match="unknown prefix source 'gauss'"):
        make_prefix_source("gauss", E)


def test_domain_region_samples_near_its_mean(tmp_path):
    E = torch.randn(80, 24)
    _trained_vae(tmp_path, E)
    source = make_prefix_source("vae", E, vae_dir=tmp_path / "vae", region="code")
    z = source.region_mean + torch.randn(4000, 4) @ source.region_chol.T
    loaded, meta = load_vae(tmp_path / "vae", E)
    torch.testing.assert_close(z.mean(0), torch.tensor(meta["domains"]["code"]["mean"]),
                               atol=0.05, rtol=0)
    with pytest.raises(UserError, match="no latent region 'poetry'"):
        make_prefix_source("vae", E, vae_dir=tmp_path / "vae", region="poetry")
