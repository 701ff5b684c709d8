"""The figures the platform writes (PNG, headless): training curves, retrieval similarity, sweep results."""

from __future__ import annotations

from pathlib import Path


def _subplots(*args, **kw):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kw)


def _save(fig, path: Path, dpi: int) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


LABELS = {"loss": "training loss", "lr": "learning rate", "samples_per_s": "samples / s (all workers)",
          "t": "SigLIP t (log temperature)", "b": "SigLIP bias b", "val_R@1": "validation R@1 (mean of both ways)"}


def plot_curves(history: list[dict], path: Path, stage: int, figures: tuple[str, ...] = ()) -> None:
    """Loss (with the validation loss where it was measured), lr, samples/s, the stage's own `figures` (stage 1's t
    and b) and validation R@1."""
    if not history:
        return
    val = [h for h in history if "val_loss" in h]
    keys = ["loss", "lr", "samples_per_s", *figures] + (["val_R@1"] if val else [])
    fig, axes = _subplots(1, len(keys), figsize=(3.2 * len(keys), 3.0))
    for ax, k in zip(axes, keys):
        pts = val if k == "val_R@1" else history
        ax.plot([h["step"] + 1 for h in pts], [h[k] for h in pts], marker="o" if k == "val_R@1" else None,
                label="training" if k == "loss" and val else None)
        if k == "loss" and val:
            ax.plot([h["step"] + 1 for h in val], [h["val_loss"] for h in val], marker="o", label="validation")
            ax.legend(fontsize=7)
        ax.set_title(LABELS[k], fontsize=9)
        ax.set_ylabel(LABELS[k], fontsize=8)
        ax.set_xlabel("step")
    fig.suptitle(f"stage {stage}")
    _save(fig, path, 80)


def plot_similarity(s, path: Path, split: str = "test") -> None:
    """Image-text cosine similarity of the first pairs; the diagonal holds the matches."""
    fig, ax = _subplots(figsize=(6, 5))
    im = ax.imshow(s.numpy(), cmap="viridis")
    ax.set_xlabel("report (text) index")
    ax.set_ylabel("volume (image) index")
    ax.set_title(f"cosine similarity, first {s.shape[0]} {split.replace(',', '+')} pairs (diagonal = match)")
    fig.colorbar(im, ax=ax)
    _save(fig, path, 100)


def plot_sweep(rows: list[dict], metric: str, path: Path) -> None:
    """Each trial at its (t' init, b init), coloured by its best metric; red edge: stopped early by ASHA."""
    fig, ax = _subplots(figsize=(6, 4.5))
    pts = [r for r in rows if r["best"] is not None]
    sc = ax.scatter([r["t_init"] for r in pts], [r["b_init"] for r in pts], c=[r["best"] for r in pts], s=120,
                    cmap="viridis", edgecolors=["red" if r["stopped_early"] else "black" for r in pts])
    for r in pts:
        ax.annotate(("T" if r["learn_t"] else "t") + ("B" if r["learn_b"] else "b"), (r["t_init"], r["b_init"]),
                    textcoords="offset points", xytext=(6, 4), fontsize=7)
    fig.colorbar(sc, ax=ax, label=f"best {metric}")
    ax.set_xlabel("t' init (log temperature)")
    ax.set_ylabel("b init")
    ax.set_title("SigLIP init sweep (red edge: stopped early by ASHA; T/B: learned)")
    _save(fig, path, 100)
