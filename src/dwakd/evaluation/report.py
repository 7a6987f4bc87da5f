"""Result tables like paper Table 1 (rows = models, columns = test sets + Avg, "mean ± std" over seeds): Markdown,
CSV, PNG.

Spread: the sample standard deviation over seeds (n - 1 in the denominator; 0 with one seed). The Avg column
averages the test sets within each seed first, then takes mean ± std of those per-seed averages over the seeds
that every test set has, so its spread is the seed-to-seed spread of the average itself.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Summary:
    """Mean and spread of one cell over its seeds."""

    mean: float
    std: float
    n: int

    def format(self, digits: int = 2) -> str:
        """'mean ± std' (just the mean with one seed)."""
        if self.n > 1:
            return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"
        return f"{self.mean:.{digits}f}"


def summarize(values: Sequence[float]) -> Summary:
    """Mean and sample standard deviation of per-seed scores."""
    if not values:
        raise ValueError("no values to summarize")
    values = [float(v) for v in values]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return Summary(statistics.fmean(values), std, len(values))


@dataclass
class ScoreTable:
    """Per-seed scores: scores[model][dataset][seed]; `datasets` fixes column order and titles."""

    datasets: list[tuple[str, str]]  # (name, column title)
    scores: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)
    metric: str = "ROUGE-L"

    @property
    def models(self) -> list[str]:
        return list(self.scores)

    def add(self, model: str, dataset: str, seed: int, value: float) -> None:
        """Record one (model, dataset, seed) score."""
        if dataset not in {name for name, _ in self.datasets}:
            raise KeyError(f"unknown dataset {dataset!r}; columns are {[n for n, _ in self.datasets]}")
        self.scores.setdefault(model, {}).setdefault(dataset, {})[int(seed)] = float(value)

    def cell(self, model: str, dataset: str) -> Summary | None:
        """Mean ± std over seeds of one cell, or None if it has no scores."""
        per_seed = self.scores.get(model, {}).get(dataset, {})
        return summarize([per_seed[s] for s in sorted(per_seed)]) if per_seed else None

    def average(self, model: str) -> Summary | None:
        """Mean ± std over seeds of the per-seed average over all test sets (None if a set is missing)."""
        per_dataset = [self.scores.get(model, {}).get(name, {}) for name, _ in self.datasets]
        if not per_dataset or any(not d for d in per_dataset):
            return None
        seeds = sorted(set.intersection(*(set(d) for d in per_dataset)))
        if not seeds:
            return None
        return summarize([statistics.fmean(d[s] for d in per_dataset) for s in seeds])

    def to_markdown(self, digits: int = 2, title: str | None = None) -> str:
        """The table as Markdown, one row per model, columns = test sets + Avg."""
        header = ["Method", *(t for _, t in self.datasets), "Avg."]
        lines = [f"**{title}**\n" if title else "", "| " + " | ".join(header) + " |",
                 "|---|" + "---:|" * (len(header) - 1)]
        for model in self.models:
            cells = [self.cell(model, name) for name, _ in self.datasets] + [self.average(model)]
            lines.append("| " + " | ".join([model, *(c.format(digits) if c else "–" for c in cells)]) + " |")
        return "\n".join(line for line in lines if line) + "\n"

    def to_rows(self) -> list[dict[str, object]]:
        """Wide rows for CSV: model, then <title> mean/std/n per column and Avg."""
        rows = []
        for model in self.models:
            row: dict[str, object] = {"method": model}
            columns = [(t, self.cell(model, n)) for n, t in self.datasets] + [("Avg", self.average(model))]
            for column, summary in columns:
                row[f"{column} mean"] = "" if summary is None else round(summary.mean, 4)
                row[f"{column} std"] = "" if summary is None else round(summary.std, 4)
                row[f"{column} seeds"] = "" if summary is None else summary.n
            rows.append(row)
        return rows

    def write_csv(self, path: str | Path) -> Path:
        """Write `to_rows()` as CSV."""
        path = Path(path)
        rows = self.to_rows()
        fields = list(rows[0]) if rows else ["method"]
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        return path

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Grouped bar chart: one group per column (test sets + Avg), one bar per model, std as error bars."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        columns = [(n, t) for n, t in self.datasets] + [(None, "Avg.")]
        models = self.models
        width = 0.8 / max(len(models), 1)
        fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(columns) * max(1, len(models)) * 0.5 + 3), 4.0))
        for k, model in enumerate(models):
            summaries = [self.cell(model, n) if n is not None else self.average(model) for n, _ in columns]
            xs = [i + (k - (len(models) - 1) / 2) * width for i in range(len(columns))]
            means = [s.mean if s else 0.0 for s in summaries]
            # Error bars: ± std, the lower one clipped at 0 (ROUGE-L is never negative).
            errs = [[min(s.std, s.mean) if s else 0.0 for s in summaries], [s.std if s else 0.0 for s in summaries]]
            ax.bar(xs, means, width, yerr=errs, capsize=3, label=model)
        ax.set_xticks(range(len(columns)))
        ax.set_xticklabels([t for _, t in columns])
        ax.set_ylabel(self.metric)
        ax.grid(axis="y", linestyle=":")
        ax.legend(fontsize="small")
        if title:
            ax.set_title(title)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def to_json(self) -> dict:
        """All per-seed scores and summaries, for results.json."""
        return {
            "metric": self.metric,
            "datasets": [{"name": n, "title": t} for n, t in self.datasets],
            "scores": {m: {d: {str(s): v for s, v in sorted(seeds.items())} for d, seeds in ds.items()}
                       for m, ds in self.scores.items()},
            "summary": {m: {**{n: _summary_dict(self.cell(m, n)) for n, _ in self.datasets},
                            "avg": _summary_dict(self.average(m))} for m in self.models},
        }

    @classmethod
    def from_json(cls, data: Mapping) -> ScoreTable:
        """Inverse of `to_json` (summaries are recomputed)."""
        table = cls([(d["name"], d["title"]) for d in data["datasets"]], metric=data.get("metric", "ROUGE-L"))
        for model, per_dataset in data["scores"].items():
            table.scores.setdefault(model, {})
            for dataset, per_seed in per_dataset.items():
                for seed, value in per_seed.items():
                    table.add(model, dataset, int(seed), value)
        return table


def _summary_dict(summary: Summary | None) -> dict | None:
    return None if summary is None else {"mean": summary.mean, "std": summary.std, "n": summary.n}


def write_report(table: ScoreTable, out_dir: str | Path, stem: str = "report",
                 title: str | None = None) -> dict[str, Path]:
    """Write <stem>.md, <stem>.csv, <stem>.png and results.json into `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / f"{stem}.md"
    md.write_text(table.to_markdown(title=title), encoding="utf-8")
    paths = {"markdown": md, "csv": table.write_csv(out_dir / f"{stem}.csv"),
             "png": table.plot(out_dir / f"{stem}.png", title=title), "json": out_dir / "results.json"}
    paths["json"].write_text(json.dumps(table.to_json(), indent=2), encoding="utf-8")
    return paths
