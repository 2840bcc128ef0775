"""Plot `metrics.jsonl` files (loss, validation loss, and any extra keys) to a PNG.

    python examples/plot_metrics.py runs/demo/pretrain/metrics.jsonl --out runs/demo/loss.png
    python examples/plot_metrics.py a/metrics.jsonl b/metrics.jsonl --keys loss reward_mean
"""
import argparse
import json
import os


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", nargs="+", help="metrics.jsonl files")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--keys", nargs="+", default=["loss", "valid_loss"])
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.keys), figsize=(5 * len(args.keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], args.keys):
        for path in args.metrics:
            records = [r for r in read(path) if r.get(key) is not None]
            label = os.path.basename(os.path.dirname(os.path.abspath(path)))
            ax.plot([r["iteration"] for r in records], [r[key] for r in records],
                    marker="." if len(records) < 30 else None, label=label)
            # Mark data-phase switches (two-phase runs log `phase`).
            phases = [(r["iteration"], r.get("phase")) for r in read(path)]
            for (_, before), (it, after) in zip(phases, phases[1:]):
                if before and after and before != after:
                    ax.axvline(it, color="grey", linestyle="--", linewidth=0.8)
                    ax.text(it, ax.get_ylim()[1], f" {after}", va="top", fontsize=7)
        ax.set_xlabel("iteration")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    tmp = args.out + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
