"""Train a TopK sparse autoencoder on MiniLM's cached tokens, resumably, on the CPU.

    python examples/train_sae.py                       # caches the tokens first if needed
    python examples/train_sae.py --steps 300           # stop early (a checkpoint is kept)
    python examples/train_sae.py --resume              # go on from the checkpoint

The tokens come from ``TokenLoader(..., shuffle=True)`` over the store that
examples/sae_tokens.yaml caches (block 3 of all-MiniLM-L6-v2 at every token of the city
statements). Every ``--every`` steps the SAE, the optimizer and ``loader.state_dict()``
go to one checkpoint file; ``--resume`` loads them and goes on with the very batches an
uninterrupted run would have drawn: each log line prints a digest of every batch's
(row, position) pairs so far, the same at the same step in both runs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
JOB = HERE / "sae_tokens.yaml"


class TopKSAE(nn.Module):
    """``x -> decode(topk(relu(encode(x - b_dec))))``: ``latents`` features, ``k`` active
    per token, decoder rows kept at unit norm (so sparsity cannot hide in their scale)."""

    def __init__(self, hidden: int, latents: int, k: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(latents, hidden, generator=g)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w)  # noqa: N815 - the usual names of an SAE's weights
        self.W_enc = nn.Parameter(w.t().clone())  # noqa: N815 - tied at the start
        self.b_enc = nn.Parameter(torch.zeros(latents))
        self.b_dec = nn.Parameter(torch.zeros(hidden))
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        top = pre.topk(self.k, dim=-1)
        acts = torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())
        return acts @ self.W_dec + self.b_dec

    @torch.no_grad()
    def normalize(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))


def fve(x: torch.Tensor, recon: torch.Tensor) -> float:
    """Fraction of variance explained: 1 - |x - recon|^2 / |x - mean(x)|^2 over the batch."""
    total = (x - x.mean(0)).pow(2).sum()
    return float(1 - (x - recon).pow(2).sum() / total)


@dataclass
class Run:
    """What a training run returns (and what its checkpoint holds besides the weights)."""

    steps: list[int] = field(default_factory=list)
    fve: list[float] = field(default_factory=list)
    digest: str = hashlib.sha256().hexdigest()
    """sha256 chain over every batch's rows and positions, step by step."""
    batches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    """(rows, positions) of the batches this process drew (kept only with ``keep``)."""


def _chain(digest: str, rows: torch.Tensor, positions: torch.Tensor) -> str:
    return hashlib.sha256(bytes.fromhex(digest) + rows.numpy().tobytes()
                          + positions.numpy().tobytes()).hexdigest()


def _save(path: Path, payload: dict[str, Any]) -> None:
    """Written aside and renamed: a crash mid-save leaves the previous checkpoint whole."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def train(store: Any, layer: int, *, steps: int, checkpoint: Path, every: int = 100,
          resume: bool = False, batch_size: int = 1024, expansion: int = 8, k: int = 32,
          lr: float = 1e-3, seed: int = 0, buffer_tokens: int = 2**16, log_every: int = 50,
          keep: bool = False, echo: Callable[[str], None] = print) -> Run:
    """Train (or, with ``resume``, go on training) an SAE until ``steps`` steps in all."""
    from actcache import TokenLoader

    loader = TokenLoader(store, layer, batch_size=batch_size, shuffle=True, seed=seed,
                         buffer_tokens=buffer_tokens)
    hidden = loader.store.hidden_size
    sae = TopKSAE(hidden, expansion * hidden, k, seed)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    run, step = Run(), 0
    if resume:
        saved = torch.load(checkpoint, weights_only=False)
        sae.load_state_dict(saved["sae"])
        opt.load_state_dict(saved["optimizer"])
        loader.load_state_dict(saved["loader"])  # refuses another store or other arguments
        step, run.steps, run.fve, run.digest = (saved["step"], saved["steps"], saved["fve"],
                                                saved["digest"])
        echo(f"resumed at step {step} (epoch {loader.epoch}, batch {saved['loader']['batches']}"
             f" of {len(loader)}), digest {run.digest[:12]}")
    fresh_epoch = not resume
    while step < steps:
        if fresh_epoch:
            loader.set_epoch(loader.epoch + (step > 0))
        fresh_epoch = True
        for batch in loader:
            x = batch.x
            if step == 0:
                with torch.no_grad():  # start the decoder bias at the data's centre
                    sae.b_dec.copy_(x.mean(0))
            recon = sae(x)
            loss = (x - recon).pow(2).sum(-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sae.normalize()
            step += 1
            run.digest = _chain(run.digest, batch.rows, batch.positions)
            if keep:
                run.batches.append((batch.rows.clone(), batch.positions.clone()))
            if step % log_every == 0 or step == steps:
                run.steps.append(step)
                run.fve.append(fve(x, recon.detach()))
                echo(f"step {step:5d}  epoch {loader.epoch}  FVE {run.fve[-1]:.3f}  "
                     f"batches digest {run.digest[:12]}")
            if step % every == 0 or step == steps:
                _save(checkpoint, {"sae": sae.state_dict(), "optimizer": opt.state_dict(),
                                   "loader": loader.state_dict(), "step": step,
                                   "steps": run.steps, "fve": run.fve, "digest": run.digest})
            if step == steps:
                break
    loader.close()
    return run


def plot(run: Run, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(run.steps, run.fve, label="FVE (fraction of variance explained)")
    ax.plot(run.steps, [1 - v for v in run.fve], label="FVU = 1 - FVE")
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ensure_store(job: Path) -> str:
    """The job's store URL, caching it in this process first if it is not there yet."""
    import actcache

    config = actcache.load_job(job)
    try:
        store = actcache.open_store(config.store)
        if store.n_rows:
            return config.store
    except Exception:  # noqa: BLE001 - any failure to open means: not cached yet
        pass
    print(f"caching {job.name} into {config.store} (in this process, no Ray)")
    actcache.run_job(config, inline=True)
    return config.store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", type=Path, default=JOB, help="The token-caching job YAML.")
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--expansion", type=int, default=8)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--every", type=int, default=100, help="Checkpoint every N steps.")
    parser.add_argument("--checkpoint", type=Path, default=Path("runs/sae.pt"))
    parser.add_argument("--resume", action="store_true", help="Go on from --checkpoint.")
    parser.add_argument("--plot", type=Path, default=None, help="Save the FVE curve (PNG).")
    args = parser.parse_args()
    if args.resume and not args.checkpoint.exists():
        print(f"error: no checkpoint at {args.checkpoint}; run without --resume first",
              file=sys.stderr)
        raise SystemExit(2)
    url = ensure_store(args.job)
    args.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    run = train(url, args.layer, steps=args.steps, checkpoint=args.checkpoint,
                every=args.every, resume=args.resume, batch_size=args.batch_size,
                expansion=args.expansion, k=args.k, lr=args.lr)
    took = time.perf_counter() - started
    print(f"{run.steps[-1] if run.steps else 0} steps, final FVE {run.fve[-1]:.3f}; "
          f"this run {took:.0f} s; checkpoint {args.checkpoint}")
    if args.plot:
        plot(run, args.plot, f"TopK SAE ({args.expansion}x, k={args.k}) on MiniLM layer "
                             f"{args.layer} tokens, batches of {args.batch_size}")
        print(f"curve -> {args.plot}")


if __name__ == "__main__":
    main()
