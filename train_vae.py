r"""Stage 1: the reasoning-strategy VAE.

For each (question q, answer o) pair, h = mean over tokens of E([q; o]), E the policy's frozen token embeddings.
A small VAE learns a latent space over h: encoder h -> (mu, log sigma^2), z = mu + sigma * eps, decoder z -> h_hat,
loss = ||h_hat - h||^2 + beta * KL(N(mu, sigma^2) || N(0, I)). Domains are mixed so that regions of z are reasoning
styles; each domain's mean and covariance of posterior means are saved ("sample from math"). In --out: vae.json,
vae.safetensors, latents.png (posterior means by domain, PCA), metrics.jsonl, args.json. Any number of ranks.

Toy world (after python -m toy.build_world --out runs/toy):
    python train_vae.py --model runs/toy/base --out runs/toy/vae \
        --data math=runs/toy/data/vae_math.jsonl,code=runs/toy/data/vae_code.jsonl,qa=runs/toy/data/vae_qa.jsonl
A real model (the paper used about 5K pairs in all):
    python train_vae.py --model Qwen/Qwen3-4B-Base --out runs/vae-qwen3-4b --template math --per-domain-cap 2000 \
        --data math=meta-math/MetaMathQA,code=../shared/data/code_alpaca.jsonl,qa=../shared/data/qa_t0.jsonl
"""

import argparse
import math

import numpy as np
import torch

from common import (SEED, ArgumentParser, RunDir, UserError, all_reduce_mean, check_ranks_in_sync, compute_init,
                    print0, progress, ranged, run_main, seed_everything, sync_gradients)
from data import TEMPLATES, format_prompt, load_mixture
from diagnostics import prefix_health
from model import (DEFAULT_PREFIX_FORM, PREFIX_FORMS, PaletteVAE, VAEPrefix, embedding_fingerprint,
                   load_embedding_matrix, load_tokenizer, resolve_checkpoint, save_vae, short_hash)

parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
arg = parser.add_argument
# Data
arg("--data", required=True, help="domain=path_or_hub_id,... (e.g. math=a.jsonl,code=b.jsonl)")
arg("--per-domain-cap", type=ranged(int, 1), default=2000, help="at most this many pairs per domain")
arg("--template", default="plain", choices=TEMPLATES)
arg("--max-tokens", type=ranged(int, 1), default=1024, help="truncate each [q; o] to this many tokens")
arg("--model", required=True, help="the policy (hub id or directory) whose embeddings are used")
# VAE (a small MLP: the ranges keep it under about a billion parameters, so a typo cannot exhaust memory)
arg("--latent-dim", type=ranged(int, 1, 1024), default=16)
arg("--hidden-dim", type=ranged(int, 1, 8192), default=256)
arg("--prefix-form", default=DEFAULT_PREFIX_FORM, choices=PREFIX_FORMS, help="how h becomes a prefix (vae.json)")
arg("--prefix-scale", type=ranged(float, above=0), default=1.0, help="the prefix's norm over a token's (in vae.json)")
arg("--depth", type=ranged(int, 0, 8), default=2, help="hidden layers in encoder and decoder")
arg("--beta", type=ranged(float, 0), default=0.1, help="KL weight: higher = smoother, blurrier latents")
arg("--kl-warmup-steps", type=ranged(int, 0), default=200, help="ramp beta from 0 over this many steps")
# Optimisation
arg("--steps", type=ranged(int, 1), default=2000)
arg("--batch-size", type=ranged(int, 1), default=128)
arg("--lr", type=ranged(float, above=0), default=1e-3)
arg("--seed", type=SEED, default=0)
arg("--out", required=True, help="output directory")

def mean_pooled_embeddings(E, token_rows):
    """h = mean over tokens of E([q; o]) for each row: (N, d). E is the frozen (V, d) matrix."""
    return torch.stack([E[torch.as_tensor(ids, dtype=torch.long)].float().mean(0) for ids in token_rows])

def silhouette_score(x, labels):
    """Mean of (b - a) / max(a, b) over x (N, k): a = mean distance within its label, b = to the nearest other label."""
    x, labels = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(labels)
    classes = labels.unique()
    dist = torch.cdist(x, x)                                                    # (N, N)
    same = labels[:, None] == labels[None]                                      # (N, N)
    a = (dist * same).sum(1) / (same.sum(1) - 1).clamp(min=1)
    b = torch.stack([dist[:, labels == c].mean(1) for c in classes], 1)         # (N, C)
    b = b.masked_fill(labels[:, None] == classes[None], float("inf")).min(1).values      # one label: inf, so nan
    return ((b - a) / torch.maximum(a, b)).mean().item()

def main(argv=None):
    args = parser.parse_args(argv)
    ddp, rank, world_size, device = compute_init()
    seed_everything(args.seed)
    run = RunDir(args.out, args)

    # -- h = mean over tokens of E([q; o]) for every pair ----------------------------------
    model_dir = resolve_checkpoint(args.model)
    E = load_embedding_matrix(model_dir)                                        # (V, d)
    tokenizer = load_tokenizer(model_dir, len(E))
    rows = [r for r in load_mixture(args.data, per_domain_cap=args.per_domain_cap, seed=args.seed) if r.get("solution") or r.get("answer")]
    if len(rows) < 2:
        raise UserError(f"--data {args.data}: {len(rows)} pair(s) with a solution or answer; the VAE "
                        "standardises h over the pairs and needs at least 2 (a few hundred to learn anything)")
    names, domains = np.unique([r["domain"] for r in rows], return_inverse=True)     # sorted names; (N,) indices
    texts = [format_prompt(r["problem"], args.template, tokenizer) + (r.get("solution") or r["answer"]) for r in rows]
    h = mean_pooled_embeddings(E, [tokenizer(t, add_special_tokens=False)["input_ids"][:args.max_tokens] for t in texts])  # (N, d)
    print0(f"{len(rows)} pairs from {', '.join(f'{n}: {(domains == i).sum()}' for i, n in enumerate(names))}")
    if args.batch_size % world_size:            # the checks that need the number of pairs and the width d
        raise UserError(f"--batch-size {args.batch_size} must be a multiple of the {world_size} ranks")
    if args.batch_size > len(rows):
        raise UserError(f"--batch-size {args.batch_size} is more than the {len(rows)} pairs in --data: it would repeat pairs")
    if args.latent_dim > E.shape[1]:
        raise UserError(f"--latent-dim {args.latent_dim} is wider than the h it encodes (the embedding width, {E.shape[1]}); lower it")

    vae = PaletteVAE(E.shape[1], args.latent_dim, args.hidden_dim, args.depth, args.prefix_form, args.prefix_scale)
    vae.set_statistics(h, E)
    vae, h = vae.to(device), h.to(device)
    opt = torch.optim.Adam(vae.parameters(), lr=args.lr)
    # one stream of batches and noise on every rank, each taking its share: the whole batch's gradient
    g, g_noise = (torch.Generator().manual_seed(args.seed + offset) for offset in (0, 1000))
    share = slice(rank * args.batch_size // world_size, (rank + 1) * args.batch_size // world_size)

    # -- train -----------------------------------------------------------------------------
    for step in (bar := progress(range(args.steps), "vae")):
        beta = args.beta * min(1.0, (step + 1) / max(args.kl_warmup_steps, 1))
        lr = args.lr * 0.5 * (1 + np.cos(np.pi * step / args.steps))           # cosine decay
        opt.param_groups[0]["lr"] = lr                                           # (one group)
        idx = torch.randint(0, len(h), (args.batch_size,), generator=g)[share].to(device)
        eps = torch.randn(args.batch_size, args.latent_dim, generator=g_noise)[share].to(device)
        loss, recon, kl = vae(h[idx], beta, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sync_gradients(vae)
        opt.step()
        loss_all, recon_all, kl_all = all_reduce_mean([loss.item(), recon.item(), kl.item()], device)   # the batch's
        if not math.isfinite(loss_all):
            raise UserError(f"non-finite VAE loss at step {step}; nothing was saved; lower --lr or --beta")
        run.log({"step": step, "loss": loss_all, "recon": recon_all, "kl": kl_all, "beta": beta, "lr": lr})
        bar.set_postfix(loss=f"{loss_all:.4f}")

    check_ranks_in_sync(vae)
    if not run.master:
        return
    vae, h = vae.eval().cpu(), h.cpu()          # -- rank 0: latent statistics, the picture, norms -------------
    with torch.no_grad():
        mu, _ = vae.encode(h)                                                   # (N, k)
        recon = ((vae.decode(mu) - h) / vae.h_std).pow(2).sum(-1).mean().item()
    silhouette = silhouette_score(mu, domains)
    from matplotlib.figure import Figure        # no pyplot: no display, nothing global to close
    centred = mu - mu.mean(0)
    xy = (centred @ torch.linalg.svd(centred, full_matrices=False)[2][:2].T).numpy()   # (N, 2) on the first two PCs
    ax = Figure(figsize=(5, 5), layout="tight").subplots()
    stats = {}
    for i, name in enumerate(names):            # each domain's latent statistics and its points in the picture
        m = mu[torch.as_tensor(domains == i)]                                   # (n, k)
        cov = torch.cov(m.T) if len(m) > 1 else torch.eye(args.latent_dim)
        stats[name] = {"mean": m.mean(0).tolist(), "cov": cov.tolist(), "n": len(m)}
        ax.scatter(xy[domains == i, 0], xy[domains == i, 1], s=4, alpha=0.6, label=name)
    ax.set(xlabel="PC 1", ylabel="PC 2", title=f"VAE posterior means (PCA), silhouette {silhouette:.3f}")
    ax.legend(markerscale=3)
    ax.figure.savefig(run.file("latents.png"), dpi=120)
    norms = {"token_embedding": vae.token_norm.item(), "mean_pooled_h": h.norm(dim=-1).mean().item(),   # mean norms
             "prefix": vae.prefix(torch.randn(256, args.latent_dim)).norm(dim=-1).mean().item()}      # (256 prior prefixes)
    print0("norms: " + " | ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in norms.items()))
    print0(f"silhouette of domains in latent space: {silhouette:.3f} | recon (standardised, at mu) {recon:.3f}")
    fingerprint = embedding_fingerprint(E)
    save_vae(vae, args.out, {"beta": args.beta, "model": args.model, "fingerprint": fingerprint,
                             "fingerprint_hash": short_hash(fingerprint), "template": args.template, "domains": stats,
                             "silhouette": silhouette, "norms": norms, "n_pairs": len(rows)})
    health, health_lines = prefix_health(VAEPrefix(E, vae=vae))    # do prior prefixes differ?
    print0(*health_lines, sep="\n")
    run.log({"silhouette": silhouette, "recon_at_mu": recon, **{f"norm_{k}": v for k, v in norms.items()}, **health},
            name="summary.jsonl")

if __name__ == "__main__":
    run_main(main)
