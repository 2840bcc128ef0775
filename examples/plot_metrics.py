"""Plot `metrics.jsonl` files (loss, validation loss per source, any extra keys) to a PNG.

    python examples/plot_metrics.py runs/demo/pretrain/metrics.jsonl --out runs/demo/loss.png
    python examples/plot_metrics.py a/metrics.jsonl b/metrics.jsonl --keys loss reward_mean

One panel per --keys entry. A key ending in `/*` draws, in one panel, the key before it and every
logged key under it: `valid_loss/*` is the blended validation loss (black) with one line per
validation source (`valid_loss/<source>`); such a panel is left out when nothing matches.
Dashed verticals mark data-phase switches.
"""
import argparse
import json
import os


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def panel_keys(key, runs):
    """The metric keys one --keys entry draws, over all runs' records, in first-logged order;
    `runs` is a list of (label, records)."""
    if not key.endswith("/*"):
        return [key]
    base = key[:-2]
    logged = {}  # dict keeps first-seen order
    for _, records in runs:
        for record in records:
            logged.update((k, None) for k in record if k.startswith(base + "/"))
    if not logged:
        return []
    return [base] + list(logged)


def phase_switches(records):
    """(iteration after which a data phase starts, its name). Exact when the records count the
    phase's samples (`samples_<phase>`, with `consumed_samples`), else the first record in it."""
    switches = []
    for before, after in zip(records, records[1:]):
        old, new = before.get("phase"), after.get("phase")
        if not (old and new and old != new):
            continue
        at = after["iteration"]
        read, consumed = after.get(f"samples_{new}"), after.get("consumed_samples")
        if read is not None and consumed:
            at -= read * after["iteration"] / consumed  # iterations run in the new phase
        switches.append((at, new))
    return switches


def draw_phase_switches(ax, records):
    for iteration, phase in phase_switches(records):
        ax.axvline(iteration, color="grey", linestyle="--", linewidth=0.8)
        ax.text(iteration, ax.get_ylim()[1], f" {phase}", va="top", fontsize=7)


def draw_panel(ax, title, keys, runs):
    for run, records in runs:
        for key in keys:
            points = [r for r in records if r.get(key) is not None]
            if not points:
                continue
            # In a per-source panel the first key is the blend: thick (black for one run).
            blend = len(keys) > 1 and key == keys[0]
            name = "blend" if blend else key.removeprefix(keys[0] + "/")
            label = run if len(keys) == 1 else (name if len(runs) == 1 else f"{run} {name}")
            style = {"linewidth": 2, **({"color": "black"} if len(runs) == 1 else {})} \
                if blend else {}
            ax.plot([r["iteration"] for r in points], [r[key] for r in points],
                    marker="." if len(points) < 30 else None, label=label, **style)
        draw_phase_switches(ax, records)
    ax.set_xlabel("iteration")
    ax.set_ylabel(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", nargs="+", help="metrics.jsonl files")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--keys", nargs="+", default=["loss", "valid_loss/*"])
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    runs = [(os.path.basename(os.path.dirname(os.path.abspath(path))), read(path))
            for path in args.metrics]
    panels = [(key.removesuffix("/*"), keys) for key in args.keys
              if (keys := panel_keys(key, runs))]
    if not panels:
        parser.error(f"--keys {' '.join(args.keys)}: nothing to plot in {' '.join(args.metrics)}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        draw_panel(ax, title, keys, runs)
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    tmp = args.out + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
