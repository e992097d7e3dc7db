r"""Stage 1: the reasoning-strategy VAE.

For each (question q, answer o) pair, h = mean over tokens of E([q; o]), with E the policy's frozen
token-embedding matrix (read alone from the checkpoint; the model itself is never built). A small
VAE learns a latent space over h: encoder h -> (mu, log sigma^2), z = mu + sigma * eps, decoder
z -> h_hat, loss = ||h_hat - h||^2 + beta * KL(N(mu, sigma^2) || N(0, I)). The data mixes domains
so that regions of z correspond to reasoning styles; the per-domain mean and covariance of the
posterior means are saved for targeted sampling ("sample from the math region").

Outputs in --out: vae.safetensors, vae.json, latents.png (PCA of the posterior means coloured by
domain, with the silhouette score of the domains), metrics.jsonl, args.json.

Toy world (after python -m toy.build_world --out runs/toy):
    python train_vae.py --model runs/toy/base --out runs/toy/vae \
        --data math=runs/toy/data/vae_math.jsonl,code=runs/toy/data/vae_code.jsonl,qa=runs/toy/data/vae_qa.jsonl
A real model (the paper used about 5K pairs in all):
    python train_vae.py --model Qwen/Qwen3-4B-Base --out runs/vae-qwen3-4b --template math \
        --data math=meta-math/MetaMathQA,code=../shared/data/code_alpaca.jsonl,qa=../shared/data/qa_t0.jsonl \
        --per-domain-cap 2000
    torchrun --nproc_per_node 8 train_vae.py ...   (each rank takes its share of every batch of
                                                    --batch-size; the result does not depend on the ranks)
"""

import argparse
import math

import numpy as np
import torch

from common import (RunDir, all_reduce_mean, check_ranks_in_sync, compute_init, print0, progress, run_main,
                    seed_everything, sync_gradients)
from data import TEMPLATES, format_prompt, load_mixture
from diagnostics import prefix_health
from guard import SEED, ArgumentParser, UserError, ranged
from model import (DEFAULT_PREFIX_FORM, PREFIX_FORMS, PaletteVAE, VAEPrefix, embedding_fingerprint, load_config,
                   load_embedding_matrix, load_tokenizer, mean_pooled_embeddings, resolve_checkpoint, save_vae, short_hash)

parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# Data
parser.add_argument("--data", required=True, help="domain=path_or_hub_id,... (e.g. math=a.jsonl,code=b.jsonl)")
parser.add_argument("--per-domain-cap", type=ranged(int, 1), default=2000, help="at most this many pairs per domain")
parser.add_argument("--template", default="plain", choices=TEMPLATES)
parser.add_argument("--max-tokens", type=ranged(int, 1), default=1024, help="truncate each [q; o] to this many tokens")
# Model
parser.add_argument("--model", required=True, help="the policy (hub id or directory) whose embeddings are used")
# VAE
# (a small MLP: the ranges keep it under about a billion parameters, so a typo cannot exhaust memory)
parser.add_argument("--latent-dim", type=ranged(int, 1, 1024), default=16)
parser.add_argument("--hidden-dim", type=ranged(int, 1, 8192), default=256)
parser.add_argument("--prefix-form", default=DEFAULT_PREFIX_FORM, choices=PREFIX_FORMS,
                    help="how a decoded h becomes a prefix embedding (model.PREFIX_FORMS); kept in vae.json")
parser.add_argument("--prefix-scale", type=ranged(float, above=0), default=1.0,
                    help="the prefix's norm over a token's (docs/results/smollm2.md measures it); kept in vae.json, "
                         "which may be edited: the VAE's training does not depend on it")
parser.add_argument("--depth", type=ranged(int, 0, 8), default=2, help="hidden layers in encoder and decoder")
parser.add_argument("--beta", type=ranged(float, 0), default=0.1, help="KL weight: higher = smoother, blurrier latents")
parser.add_argument("--kl-warmup-steps", type=ranged(int, 0), default=200, help="ramp beta from 0 over this many steps")
# Optimisation
parser.add_argument("--steps", type=ranged(int, 1), default=2000)
parser.add_argument("--batch-size", type=ranged(int, 1), default=128)
parser.add_argument("--lr", type=ranged(float, above=0), default=1e-3)
parser.add_argument("--seed", type=SEED, default=0)
# Output
parser.add_argument("--out", required=True, help="output directory")


def silhouette_score(x, labels):
    """Mean silhouette of points x (N, k) under integer labels: (b - a) / max(a, b) per point,
    a = mean distance to the rest of its own cluster, b = mean distance to the nearest other one."""
    x = torch.as_tensor(x, dtype=torch.float64)
    labels = torch.as_tensor(labels)
    classes = labels.unique()
    if len(classes) < 2:
        return float("nan")
    dist = torch.cdist(x, x)                                                    # (N, N)
    same = labels[:, None] == labels[None]                                      # (N, N)
    a = (dist * same).sum(1) / (same.sum(1) - 1).clamp(min=1)
    b = torch.stack([dist[:, labels == c].mean(1) for c in classes], 1)         # (N, C)
    b = b.masked_fill(labels[:, None] == classes[None], float("inf")).min(1).values
    return ((b - a) / torch.maximum(a, b)).mean().item()


def plot_latents(mu, domains, names, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    centred = mu - mu.mean(0)
    _, _, V = torch.linalg.svd(centred, full_matrices=False)
    xy = (centred @ V[:2].T).numpy()                                            # (N, 2)
    fig, ax = plt.subplots(figsize=(5, 5))
    for i, name in enumerate(names):
        sel = domains == i
        ax.scatter(xy[sel, 0], xy[sel, 1], s=4, alpha=0.6, label=name)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title)
    ax.legend(markerscale=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_vae_size(args, dim, n_pairs, world_size):
    """What can only be checked once the embedding width d and the number of pairs are known."""
    if args.batch_size % world_size:
        raise UserError(f"--batch-size {args.batch_size} must be a multiple of the {world_size} ranks")
    if n_pairs < 2:
        raise UserError(f"--data {args.data}: {n_pairs} pair with a solution or answer; the VAE "
                        "standardises h over the pairs and needs at least 2 (a few hundred to learn anything)")
    if args.batch_size > n_pairs:
        raise UserError(f"--batch-size {args.batch_size} is more than the {n_pairs} pairs in --data "
                        "(batches are drawn with replacement: a larger one only repeats pairs); lower it")
    if args.latent_dim > dim:
        raise UserError(f"--latent-dim {args.latent_dim} is wider than the h it encodes "
                        f"(the embedding width, {dim}); lower it")


def main(argv=None):
    args = parser.parse_args(argv)
    ddp, rank, world_size, device = compute_init()
    seed_everything(args.seed)
    run = RunDir(args.out, args)

    # -- h = mean over tokens of E([q; o]) for every pair ----------------------------------
    model_dir = resolve_checkpoint(args.model)
    E = load_embedding_matrix(model_dir)                                        # (V, d)
    tokenizer = load_tokenizer(model_dir, len(E))
    rows = load_mixture(args.data, per_domain_cap=args.per_domain_cap, seed=args.seed)
    rows = [r for r in rows if r.get("solution") or r.get("answer")]
    if not rows:
        raise UserError(f"--data {args.data}: no rows with a solution or answer to embed")
    names = sorted({r["domain"] for r in rows})
    domains = np.array([names.index(r["domain"]) for r in rows])
    texts = [format_prompt(r["problem"], args.template, tokenizer) + (r.get("solution") or r["answer"])
             for r in rows]
    token_rows = [tokenizer(t, add_special_tokens=False)["input_ids"][:args.max_tokens] for t in texts]
    h = mean_pooled_embeddings(E, token_rows)                                   # (N, d)
    print0(f"{len(rows)} pairs from {', '.join(f'{n}: {(domains == i).sum()}' for i, n in enumerate(names))}")
    check_vae_size(args, E.shape[1], len(rows), world_size)

    vae = PaletteVAE(E.shape[1], args.latent_dim, args.hidden_dim, args.depth, args.prefix_form, args.prefix_scale)
    vae.set_statistics(h, E)
    vae.to(device)
    h = h.to(device)
    opt = torch.optim.Adam(vae.parameters(), lr=args.lr)
    # one stream of batches and noise on every rank, each rank taking its share of each batch: the
    # gradient averaged over ranks is the one of the whole batch, whatever the number of ranks
    g = torch.Generator(device="cpu").manual_seed(args.seed)
    g_noise = torch.Generator(device="cpu").manual_seed(args.seed + 1000)
    share = slice(rank * args.batch_size // world_size, (rank + 1) * args.batch_size // world_size)

    # -- train -----------------------------------------------------------------------------
    bar = progress(range(args.steps), "vae")
    for step in bar:
        beta = args.beta * min(1.0, (step + 1) / max(args.kl_warmup_steps, 1))
        lr = args.lr * 0.5 * (1 + np.cos(np.pi * step / args.steps))           # cosine decay
        for group in opt.param_groups:
            group["lr"] = lr
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
    # -- latent statistics, pictures and norms -----------------------------------------------
    vae.eval().cpu()
    h = h.cpu()
    with torch.no_grad():
        mu, _ = vae.encode(h)                                                   # (N, k)
        recon = ((vae.decode(mu) - h) / vae.h_std).pow(2).sum(-1).mean().item()
        prior_prefix = vae.prefix(torch.randn(256, args.latent_dim))
    stats = {}
    for i, name in enumerate(names):
        m = mu[torch.as_tensor(domains == i)]
        cov = torch.cov(m.T) if len(m) > 1 else torch.eye(args.latent_dim)
        stats[name] = {"mean": m.mean(0).tolist(), "cov": cov.tolist(), "n": len(m)}
    silhouette = silhouette_score(mu, domains)
    plot_latents(mu, domains, names, run.file("latents.png"),
                 f"VAE posterior means (PCA), silhouette {silhouette:.3f}")
    norms = {"token_embedding": vae.token_norm.item(), "mean_pooled_h": h.norm(dim=-1).mean().item(),
             "prefix": prior_prefix.norm(dim=-1).mean().item()}
    print0(f"norms: token embedding {norms['token_embedding']:.3f} | mean-pooled h "
           f"{norms['mean_pooled_h']:.3f} | decoded prefix {norms['prefix']:.3f}")
    print0(f"silhouette of domains in latent space: {silhouette:.3f} | recon (standardised, at mu) {recon:.3f}")
    fingerprint = embedding_fingerprint(E)
    save_vae(vae, args.out, {
        "beta": args.beta, "model": args.model, "fingerprint": fingerprint,
        "fingerprint_hash": short_hash(fingerprint), "template": args.template,
        "domains": stats, "silhouette": silhouette, "norms": norms, "n_pairs": len(rows)})
    health, health_lines = prefix_health(VAEPrefix(E, vae=vae))    # do prior prefixes differ?
    for line in health_lines:
        print0(line)
    run.log({"silhouette": silhouette, "recon_at_mu": recon, **{f"norm_{k}": v for k, v in norms.items()},
             **health},
            name="summary.jsonl")
    print0(f"saved {args.out}/vae.safetensors, vae.json and latents.png")


if __name__ == "__main__":
    run_main(main)
