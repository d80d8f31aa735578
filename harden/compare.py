"""Compare runs side by side: accuracies, paired significance on the examples they share, cost.

A run folder is what ``harden run`` (or ``harden verify --out``) writes: ``report.json`` holds
the accuracies and, per example, which attack first fooled it and the outcome of every attack
outside the l_p threat model; ``certificate.json`` (optional) adds the policy, seed and
training time. Two runs verified on the same data are paired on the test-split indices both
verified (``outcomes.indices``, written since harden draws class-balanced samples); reports
without indices share their first ``min(n_a, n_b)`` examples, in data order.

For a pair of runs and a measure (clean, robust, or an other threat), the paired test is
McNemar's exact test on the shared examples: with ``b`` examples right in the first run only and
``c`` right in the second only, ``p = min(1, 2 * P(Binomial(b + c, 1/2) <= min(b, c)))``. Runs of
one policy with several seeds form a group; a group's figure is the mean and sample standard
deviation over its runs, and each seed is paired with the baseline group's run of the same seed.

Example:
    >>> mcnemar([True, True, False, True], [False, True, False, False])
    (2, 0, 0.5)
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scipy.stats import binom

from harden.errors import DataError

__all__ = ["Comparison", "Run", "compare_runs", "load_run", "mcnemar"]

#: the measures every run has
BASE_MEASURES = ("clean", "robust")


@dataclass
class Run:
    """One verified run, per example.

    Attributes:
        path: the run folder.
        name: the policy's name (the group of its seeds).
        seed: the policy's seed.
        data: the dataset verified on (runs on other data are not paired).
        right: per measure (``clean``, ``robust``, each other threat), per example: True right,
            False wrong, None not measured.
        fit_seconds: training time (None when unknown).
        threat: the threat model verified against.
        attacks: the attack specifications of the verification.
        indices: the test-split index of each verified example (None: an older report, whose
            examples are the first ``n``).
    """

    path: Path
    name: str
    seed: int
    data: str
    right: dict[str, list[bool | None]] = field(default_factory=dict)
    fit_seconds: float | None = None
    threat: dict[str, Any] = field(default_factory=dict)
    attacks: list[Any] = field(default_factory=list)
    indices: list[int] | None = None

    @property
    def n(self) -> int:
        """Examples verified."""
        return len(self.right["clean"])

    def accuracy(self, measure: str) -> float | None:
        """Share right among the examples measured (None when the run lacks the measure)."""
        values = [v for v in self.right.get(measure, []) if v is not None]
        return sum(values) / len(values) if values else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        raise DataError(f"expected a JSON object in {str(path)!r}, got {type(exc).__name__}: {exc}") from None


def load_run(path: str | Path) -> Run:
    """Read a run folder (``report.json``, and ``certificate.json`` when present).

    Raises:
        DataError: no ``report.json``, or one without per-example outcomes (written before
            harden kept them: verify the model again).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"expected a run folder with report.json at {str(path)!r}, got no such folder")
    report_file = path / "report.json" if path.is_dir() else path
    if not report_file.is_file():
        raise DataError(f"expected {report_file} (harden run or harden verify writes it), got no such file")
    report = _read_json(report_file)
    outcomes = report.get("outcomes") or {}
    broken = outcomes.get("broken_by")
    if not isinstance(broken, list) or len(broken) != report.get("n"):
        raise DataError(f"expected per-example outcomes in {report_file}, got none; run harden verify on it again")
    right: dict[str, list[bool | None]] = {
        "clean": [b != "clean" for b in broken],
        "robust": [b == "" for b in broken],
    }
    for label, values in (outcomes.get("other") or {}).items():
        right[label] = [None if v < 0 else bool(v) for v in values]
    indices = outcomes.get("indices")
    if indices is not None and (
        not isinstance(indices, list)
        or len(indices) != len(broken)
        or not all(type(i) is int and i >= 0 for i in indices)
        or len(set(indices)) != len(indices)
    ):
        raise DataError(f"expected outcomes.indices in {report_file} to be {len(broken)} distinct indices >= 0, got another value")
    cert_file = (path if path.is_dir() else path.parent) / "certificate.json"
    cert = _read_json(cert_file) if cert_file.is_file() else {}
    timings = cert.get("timings") or {}
    name = str(cert.get("policy_name") or path.name)
    data = str(report.get("data_name", ""))
    seed = int(cert.get("seed", report.get("seed", 0)))
    fit = timings.get("fit")
    return Run(
        path,
        name,
        seed,
        data,
        right,
        float(fit) if fit is not None else None,
        dict(report.get("threat") or {}),
        list(report.get("attacks") or []),
        indices,
    )


def shared_outcomes(a: Run, b: Run, measure: str) -> tuple[list[bool | None], list[bool | None]]:
    """The outcomes of ``measure`` on the examples both runs verified, paired example by example.

    Example:
        >>> a = Run(Path("a"), "a", 0, "d", {"clean": [True, False, True]}, indices=[0, 4, 7])
        >>> b = Run(Path("b"), "b", 0, "d", {"clean": [False, True]}, indices=[7, 0])
        >>> shared_outcomes(a, b, "clean")
        ([True, True], [True, False])
    """
    if a.indices is None or b.indices is None:
        n = min(a.n, b.n)
        return a.right[measure][:n], b.right[measure][:n]
    where = {idx: k for k, idx in enumerate(b.indices)}
    pairs = [(k, where[idx]) for k, idx in enumerate(a.indices) if idx in where]
    return [a.right[measure][i] for i, _ in pairs], [b.right[measure][j] for _, j in pairs]


def mcnemar(a: Sequence[bool | None], b: Sequence[bool | None]) -> tuple[int, int, float]:
    """McNemar's exact test on paired outcomes (pairs with a None are skipped).

    Returns:
        ``(b, c, p)``: right in ``a`` only, right in ``b`` only, the two-sided exact p-value.
    """
    pairs = [(x, y) for x, y in zip(a, b, strict=False) if x is not None and y is not None]
    only_a = sum(1 for x, y in pairs if x and not y)
    only_b = sum(1 for x, y in pairs if y and not x)
    k = only_a + only_b
    p = 1.0 if k == 0 else min(1.0, 2 * float(binom.cdf(min(only_a, only_b), k, 0.5)))
    return only_a, only_b, p


@dataclass
class Comparison:
    """Groups of runs (one per policy), their figures and their paired tests against the baseline.

    Attributes:
        groups: policy name -> its runs (seeds), in the order given.
        measures: the measures every run has.
        baseline: the first group's name.
    """

    groups: dict[str, list[Run]]
    measures: list[str]
    baseline: str

    def figure(self, name: str, measure: str) -> tuple[float, float | None]:
        """Mean and sample standard deviation (None for one run) of ``measure`` over the group."""
        values = [v for r in self.groups[name] if (v := r.accuracy(measure)) is not None]
        if not values:
            return math.nan, None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None

    def tests(self, name: str, measure: str) -> list[dict[str, Any]]:
        """Per seed shared with the baseline: McNemar on the shared examples (``b``, ``c``, ``p``, ``n``)."""
        base = {r.seed: r for r in self.groups[self.baseline]}
        out = []
        for run in self.groups[name]:
            other = base.get(run.seed)
            if other is None or other is run or measure not in run.right or measure not in other.right:
                continue
            mine, theirs = shared_outcomes(run, other, measure)
            n = len(mine)
            b, c, p = mcnemar(mine, theirs)
            out.append({"seed": run.seed, "n": n, "only_this": b, "only_baseline": c, "p": p})
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: per group and measure, mean, sd, runs and the paired tests."""
        return {
            "baseline": self.baseline,
            "measures": self.measures,
            "groups": {
                name: {
                    "runs": [str(r.path) for r in runs],
                    "seeds": [r.seed for r in runs],
                    "fit_seconds": [r.fit_seconds for r in runs],
                    "measures": {
                        m: {
                            "mean": self.figure(name, m)[0],
                            "sd": self.figure(name, m)[1],
                            "paired": self.tests(name, m),
                        }
                        for m in self.measures
                    },
                }
                for name, runs in self.groups.items()
            },
        }

    def plot_png(self) -> bytes:
        """A grouped bar chart of every measure per group (mean over seeds), PNG bytes.

        Error bars: the 95 % Wilson interval of the group's examples pooled over its seeds (an
        interval for the pooled share, shown around the mean over seeds).
        """
        import io

        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        from harden.smoothing import wilson_interval

        fig = Figure(figsize=(1.6 + 1.2 * len(self.measures) * len(self.groups) / 2, 3.6), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        width = 0.8 / max(len(self.groups), 1)
        for g, (name, runs) in enumerate(self.groups.items()):
            means, lows, highs = [], [], []
            for m in self.measures:
                values = [v for r in runs for v in r.right.get(m, []) if v is not None]
                k, n = sum(values), len(values)
                mean = self.figure(name, m)[0]
                lo, hi = wilson_interval(k, n) if n else (math.nan, math.nan)
                means.append(mean)
                lows.append(max(mean - lo, 0.0))
                highs.append(max(hi - mean, 0.0))
            xs = [i + g * width for i in range(len(self.measures))]
            ax.bar(xs, means, width, yerr=[lows, highs], capsize=3, label=f"{name} ({len(runs)})")
        ax.set_xticks([i + width * (len(self.groups) - 1) / 2 for i in range(len(self.measures))])
        ax.set_xticklabels(self.measures, rotation=20, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=7)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()

    def table(self) -> str:
        """A plain-text table: one row per group, one column per measure, training time last.

        Each cell is ``mean`` (``± sd`` over seeds) and, for groups other than the baseline,
        the paired tests as ``(+b/-c, p)`` per seed.
        """
        header = ["policy", "runs", *self.measures, "fit s"]
        rows = []
        for name, runs in self.groups.items():
            cells = [name, str(len(runs))]
            for m in self.measures:
                mean, sd = self.figure(name, m)
                cell = f"{mean:.1%}" + (f" ± {sd:.1%}" if sd is not None else "")
                if name != self.baseline:
                    cell += "".join(
                        f" (+{t['only_this']}/-{t['only_baseline']}, p={t['p']:.2g})" for t in self.tests(name, m)
                    )
                cells.append(cell)
            fits = [r.fit_seconds for r in runs if r.fit_seconds is not None]
            cells.append(f"{statistics.fmean(fits):.0f}" if fits else "-")
            rows.append(cells)
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        note = f"paired: McNemar exact test against {self.baseline!r} on the shared examples, same seed"
        return "\n".join([*lines, note])


def compare_runs(paths: Sequence[str | Path]) -> Comparison:
    """Load runs and group them by policy name; the first run's policy is the baseline.

    The policy's ``data.name`` names the data (a report cannot tell tensors handed to
    ``harden.verify`` apart): compare runs verified on the same test split.

    Raises:
        DataError: no runs; runs verified on different data, at different threat models or
            with different attack suites (their accuracies measure different things); two runs
            of one policy with one seed.

    Example:
        >>> import json, tempfile
        >>> from pathlib import Path
        >>> root = Path(tempfile.mkdtemp())
        >>> for name, broken in [("a", ["", "clean", ""]), ("b", ["", "", "pgd"])]:
        ...     (root / name).mkdir()
        ...     _ = (root / name / "report.json").write_text(json.dumps({"n": 3, "outcomes": {"broken_by": broken}}))
        >>> cmp = compare_runs([root / "a", root / "b"])
        >>> cmp.figure("b", "clean"), cmp.tests("b", "robust")[0]["p"]
        ((1.0, None), 1.0)
    """
    if not paths:
        raise DataError("expected at least one run folder, got none")
    runs = [load_run(p) for p in paths]
    datasets = {r.data for r in runs if r.data}
    if len(datasets) > 1:
        raise DataError(f"expected runs verified on one dataset, got {sorted(datasets)}: their examples are not shared")
    for what, key in (("threat model", lambda r: r.threat), ("attack suite", lambda r: r.attacks)):
        if any(key(r) != key(runs[0]) for r in runs):
            odd = next(r for r in runs if key(r) != key(runs[0]))
            raise DataError(
                f"expected runs verified with one {what}, got {key(runs[0])} in {runs[0].path} and {key(odd)} in "
                f"{odd.path}; verify them with the same policy's threat and verify sections"
            )
    groups: dict[str, list[Run]] = {}
    for run in runs:
        if any(r.seed == run.seed for r in groups.get(run.name, [])):
            raise DataError(f"expected one run per seed of policy {run.name!r}, got two of seed {run.seed}: {run.path}")
        groups.setdefault(run.name, []).append(run)
    common = [m for m in runs[0].right if all(m in r.right for r in runs)]
    measures = [*BASE_MEASURES, *[m for m in common if m not in BASE_MEASURES]]
    return Comparison(groups, measures, runs[0].name)
