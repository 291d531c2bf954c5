"""PNG figures of the routing analyses, laid out like the paper's (section 5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def shown_layers(num_layers: int) -> list[int]:
    """The first, middle and last layer (the paper shows 0, 7 and 15 of 16)."""
    return sorted({0, (num_layers - 1) // 2, num_layers - 1})


def _shown_entries(result: dict) -> list[dict]:
    """The result's per-layer entries of `shown_layers` (of those analysed: all when 3 or fewer)."""
    entries = result["layers"]
    if len(entries) <= 3:
        return entries
    wanted = shown_layers(len(entries))
    return [entry for i, entry in enumerate(entries) if i in wanted]


def _save(fig, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp.png")
    fig.tight_layout()
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)


def plot_saturation(result: dict, path: Path) -> None:
    plt = _pyplot()
    k = result["top_k"]
    rows = result["checkpoints"]
    x = [r["fraction"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colors = plt.cm.viridis(np.linspace(0, 1, result["num_layers"]))
    for ax, key, title in ((axes[0], "top1", "k = 1"), (axes[1], f"top{k}", f"k = {k}")):
        for layer in range(result["num_layers"]):
            ax.plot(x, [100 * r[key][layer] for r in rows], marker="o", color=colors[layer], label=f"layer {layer}")
        ax.set_title(f"Router saturation, {title}")
        ax.set_xlabel(f"fraction of training ({result['fraction_by']})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("saturation (%)")
    axes[1].legend(fontsize=7, ncol=2)
    _save(fig, path)
    plt.close(fig)


def plot_coactivation(result: dict, path: Path) -> None:
    plt = _pyplot()
    layers = _shown_entries(result)
    fig, axes = plt.subplots(1, len(layers), figsize=(4.5 * len(layers), 4), squeeze=False)
    for ax, entry in zip(axes[0], layers):
        matrix = np.array(entry["matrix"])
        np.fill_diagonal(matrix, np.nan)
        image = ax.imshow(100 * matrix, cmap="Reds", vmin=0, interpolation="nearest")
        ax.set_title(f"Layer {entry['layer']}: co-activation (%)")
        ax.set_xlabel("expert j")
        ax.set_ylabel("expert i (given)")
        fig.colorbar(image, ax=ax, fraction=0.046)
    _save(fig, path)
    plt.close(fig)


def plot_domains(result: dict, path: Path) -> None:
    plt = _pyplot()
    layers = _shown_entries(result)
    experts = np.arange(result["num_experts"])
    sources = result["sources"]
    fig, axes = plt.subplots(len(layers), 1, figsize=(max(8, result["num_experts"] * 0.18), 2.8 * len(layers)),
                             squeeze=False)
    width = 0.8 / len(sources)
    for ax, entry in zip(axes[:, 0], layers):
        for s, name in enumerate(sources):
            ax.bar(experts + s * width, 100 * np.array(entry["specialisation"][s]), width=width, label=name)
        ax.axhline(100 * result["uniform"], color="black", linestyle="--", linewidth=1, label="uniform k/E")
        ax.set_title(f"Layer {entry['layer']}: domain specialisation")
        ax.set_ylabel("% of the domain's tokens")
        ax.set_xlabel("expert")
    axes[0, 0].legend(fontsize=8, ncol=len(sources) + 1)
    _save(fig, path)
    plt.close(fig)


def plot_vocab(result: dict, path: Path) -> None:
    plt = _pyplot()
    layers = [entry["layer"] for entry in result["layers"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    for by, marker in (("input", "o"), ("predicted", "s")):
        ax.plot(layers, [100 * entry[by]["mean_specialisation"] for entry in result["layers"]], marker=marker,
                label=f"by {by} token")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean vocabulary specialisation (%)")
    ax.set_title("Vocabulary specialisation")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)
    plt.close(fig)
