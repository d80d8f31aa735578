"""The per-batch worst-case cascade loop shared by :func:`harden.verify` and :func:`harden.verify_onnx`."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from harden.attacks import SuiteResult, build_attack, run_suite
from harden.attacks.base import AttackEnv
from harden.attacks.suite import order_attacks, suite_labels
from harden.attacks.transfer import Transfer
from harden.data import EvalData, check_batch, eval_batches, load_data, to_device
from harden.errors import DataError
from harden.splits import select_examples
from harden.surrogate import attach_surrogates

if TYPE_CHECKING:
    from harden.attacks.base import Attack
    from harden.data import DataBundle
    from harden.policy import AttackSpec, Policy


@dataclass
class CascadeTally:
    """What :func:`run_cascade` accumulated over the batches.

    Attributes:
        result: the l_p cascade's :class:`harden.attacks.SuiteResult` over every example
            (without ``x_adv``).
        other_right: per label of an attack outside the l_p threat model, the examples it
            scored right.
        other_n: per such label, the examples it was measured on.
        other_outcomes: per such label, per example in data order: 1 scored right, 0 wrong, -1
            not measured (beyond the attack's ``n_examples``, or no example could be built).
        check_x: the inputs of the check subset, as per-batch slices.
        check_y: their labels, as per-batch slices.
        check_adv: their worst-case inputs under the l_p suite, as per-batch slices on the batches'
            device: the point of the attack that fooled the example, else the last attack's output;
            the clean input where no attack ran (wrong when clean, or no l_p attack).
        adversarial: up to ``keep_adversarial`` worst-case inputs (CPU, float32): the examples an
            attack fooled first, then attacked examples that survived; None when none were kept.
        indices: per verified example, its index in the data handed to :func:`run_cascade`.
        labels: per verified example, its label.
        check: per verified example, whether it is in the check subset.
        sample: how the examples were drawn (``balanced`` or ``first``).
    """

    result: SuiteResult
    other_right: dict[str, int]
    other_n: dict[str, int]
    other_outcomes: dict[str, list[int]] = field(default_factory=dict)
    check_x: list[torch.Tensor] = field(default_factory=list)
    check_y: list[torch.Tensor] = field(default_factory=list)
    check_adv: list[torch.Tensor] = field(default_factory=list)
    adversarial: torch.Tensor | None = None
    indices: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    check: list[bool] = field(default_factory=list)
    sample: str = "first"

    def report_fields(
        self,
        policy: Policy,
        specs: Sequence[AttackSpec],
        seconds: float,
        *,
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """The fields every robustness report takes from a cascade (accuracies, counts, threat, timing).

        ``num_classes`` and ``class_names`` (when known) list every class in ``per_class``, also
        one without a verified example (``n`` 0).
        """
        result = self.result
        n = int(result.clean_correct.numel())
        counts = Counter(b for b in result.broken_by if b)
        in_check = torch.tensor(self.check, dtype=torch.bool) if self.check else torch.zeros(n, dtype=torch.bool)
        check_n = int(in_check.sum())
        check_clean = int(result.clean_correct[in_check].sum()) / check_n if check_n else 0.0
        return {
            "n": n,
            "clean_accuracy": int(result.clean_correct.sum()) / n,
            "robust_accuracy": int(result.robust.sum()) / n,
            "per_attack": {k: int(v.sum()) / n for k, v in result.still_correct.items()},
            "broken_by": {k: counts.get(k, 0) for k in ["clean", *result.labels]},
            "attack_seconds": dict(result.seconds),
            "threat": policy.threat.model_dump(mode="json"),
            "attacks": [spec.model_dump(mode="json") for spec in specs],
            "seconds": seconds,
            "seed": policy.seed,
            "other_threats": {k: v / max(self.other_n[k], 1) for k, v in self.other_right.items()},
            "other_counts": self.other_n,
            "outcomes": {
                "broken_by": list(result.broken_by),
                "other": self.other_outcomes,
                "indices": list(self.indices),
            },
            "data_name": policy.data.name,
            "per_class": self.per_class(num_classes, class_names),
            "check_n": check_n,
            "check_clean_accuracy": check_clean,
            "sample": self.sample,
        }

    def per_class(
        self, num_classes: int | None = None, class_names: Sequence[str] | None = None
    ) -> list[dict[str, Any]]:
        """Per class: ``label``, ``name`` (None when unknown), ``n``, ``clean`` and ``robust`` counts of the verified examples."""
        labels = torch.tensor(self.labels, dtype=torch.int64)
        k = max(num_classes or 0, len(class_names or ()), int(labels.max()) + 1 if labels.numel() else 0)
        clean, robust = self.result.clean_correct.cpu(), self.result.robust.cpu()
        out = []
        for c in range(k):
            mine = labels == c
            name = str(class_names[c]) if class_names is not None and c < len(class_names) else None
            out.append(
                {
                    "label": c,
                    "name": name,
                    "n": int(mine.sum()),
                    "clean": int(clean[mine].sum()),
                    "robust": int(robust[mine].sum()),
                }
            )
        return out


def prepared_attacks(
    specs: Sequence[AttackSpec],
    policy: Policy,
    bundle: DataBundle | None,
    device: torch.device,
    surrogate: nn.Module | None = None,
) -> tuple[list[Attack], list[Attack], list[int | None]]:
    """Build and prepare the attacks ``specs`` name, in cascade order.

    Attacks that read the training split (the invariance-example pool, a surrogate to train)
    get ``bundle``; without one, the policy's data is loaded here, once, so every entry point
    (``harden run``, ``harden.verify(model, policy, data)``) measures them on the same split.
    Transfer attacks without a surrogate get one from :mod:`harden.surrogate`.

    Args:
        specs: the attacks, as the policy lists them.
        policy: gives the threat model (and, to ``prepare``, the data and seed).
        bundle: the run's data (its train split is the pool and the surrogate's training data);
            None: the policy's data, loaded only if an attack needs it.
        device: where the attacks run.
        surrogate: given to transfer attacks before they prepare (so none is trained).

    Returns:
        ``(lp_attacks, other_attacks, other_caps)``: the l_p cascade, the attacks outside the
        l_p threat model, and each of those one's ``n_examples`` cap.
    """
    attacks = [build_attack(spec, policy.threat) for spec in specs]
    caps = {id(a): spec.n_examples for a, spec in zip(attacks, specs, strict=True)}
    for attack in attacks:
        if surrogate is not None and isinstance(attack, Transfer):
            attack.surrogate = surrogate
    if bundle is None and any(a.uses_training_split and not _has_surrogate(a) for a in attacks):
        bundle = _training_split(policy, attacks)
    if bundle is not None:
        attach_surrogates(attacks, policy, bundle, device)
    env = AttackEnv(policy=policy, bundle=bundle, device=device)
    for attack in attacks:
        attack.prepare(env)
    lp_attacks, other_attacks = order_attacks(attacks)
    return list(lp_attacks), list(other_attacks), [caps[id(a)] for a in other_attacks]


def _training_split(policy: Policy, attacks: Sequence[Attack]) -> DataBundle | None:
    """The policy's data, for attacks that read its training split; None where it cannot be loaded.

    Without it, ``invariance_examples`` falls back to the attacked batch as its pool (with a
    warning); a transfer surrogate cannot be trained without it (the DataError stands).
    """
    try:
        return load_data(policy.data)
    except DataError as exc:
        if any(isinstance(a, Transfer) and a.surrogate is None for a in attacks):
            raise DataError(
                f"expected the policy's data for the transfer attack's surrogate (trained or loaded on its training "
                f"split), got: {exc}; pass bundle= (harden.data.load_data of that data) or set attack.surrogate"
            ) from None
        warnings.warn(
            f"the policy's data could not be loaded ({exc}): invariance_examples searches the attacked batch "
            "instead of the training split, so its figure is not comparable with harden run's; pass bundle= "
            "(harden.data.load_data of the policy's data) to verify",
            UserWarning,
            stacklevel=3,
        )
        return None


def _has_surrogate(attack: Attack) -> bool:
    return isinstance(attack, Transfer) and attack.surrogate is not None


def run_cascade(
    net: nn.Module,
    data: EvalData,
    lp_attacks: Sequence[Attack],
    other_attacks: Sequence[Attack],
    other_caps: Sequence[int | None],
    device: torch.device,
    *,
    batch_size: int,
    limit: int | None,
    desc: str,
    progress: bool,
    in_chans: int | None = None,
    check_examples: int = 0,
    keep_adversarial: int = 0,
    sample: str = "first",
    seed: int = 0,
) -> CascadeTally:
    """Run the worst-case cascade over the eval batches of ``data``, on ``limit`` examples of it.

    The examples (and the check subset among them) are chosen by :func:`select_examples`. Per
    batch: check it, move it to ``device``, run ``lp_attacks`` as a cascade (each only on the
    examples still robust), score each of ``other_attacks`` on up to its cap of examples,
    collect the check subset and update the progress bar. The caller owns the model's modes and
    the RNG (seed it before calling).

    Args:
        net: the model under attack (a PyTorch model or an ONNX session module).
        data: a DataLoader, a Dataset, or an ``(x, y)`` pair of tensors.
        lp_attacks: the l_p attacks, in cascade order.
        other_attacks: attacks outside the l_p threat model, each run on every example.
        other_caps: per attack of ``other_attacks``, the most examples it scores (None: all).
        device: where batches go.
        batch_size: the eval batch size.
        limit: verify this many examples (None: all of ``data``).
        desc: the progress bar's label.
        progress: show a progress bar.
        in_chans: the input channels the batches must have (None: any).
        check_examples: collect this many of the verified examples for the sanity checks.
        keep_adversarial: keep up to this many worst-case inputs of the l_p cascade.
        sample: ``balanced`` (a seeded class-balanced sample) or ``first`` (the first examples).
        seed: the seed of the sample (the policy's ``seed``).

    Returns:
        A :class:`CascadeTally`.

    Raises:
        DataError: no examples, or a batch that does not pass :func:`harden.data.check_batch`.
    """
    sel = select_examples(data, limit, check_examples, sample, seed)
    other_labels = suite_labels([a.name for a in other_attacks])
    other_right, other_n = dict.fromkeys(other_labels, 0), dict.fromkeys(other_labels, 0)
    other_outcomes: dict[str, list[int]] = {label: [] for label in other_labels}
    check_x: list[torch.Tensor] = []
    check_y: list[torch.Tensor] = []
    check_adv: list[torch.Tensor] = []
    labels: list[int] = []
    fooled_adv: list[torch.Tensor] = []  # worst-case inputs that fooled the model, then survivors'
    survived_adv: list[torch.Tensor] = []
    seen = 0
    result: SuiteResult | None = None
    total = len(sel.indices) if sel.indices is not None else limit
    with tqdm(total=total, desc=desc, disable=not progress, leave=False, unit="img") as bar:
        for xb, yb in eval_batches(sel.data, batch_size, limit):
            check_batch(xb, yb, in_chans=in_chans)
            x, y = to_device(xb, yb, device)
            moves = _BarMoves(bar, seen, x.shape[0], len(lp_attacks), len(other_attacks))
            mask = _in_check(sel.check, check_examples, seen, x.shape[0])
            part = _lp_part(net, x, y, lp_attacks, (keep_adversarial, fooled_adv, survived_adv), mask, moves.lp)
            if bool(mask.any()):
                on = mask.to(x.device)
                check_x.append(x[on])
                check_y.append(y[on])
                check_adv.append(x[on] if part.x_adv is None else part.x_adv[mask].to(x.device))  # x_adv is on the CPU
            part.x_adv = None  # kept what we need; do not accumulate every batch
            if result is None:
                result = part
            else:
                result.extend(part)
            for label, attack, cap in zip(other_labels, other_attacks, other_caps, strict=True):
                right, counted, outcome = _score_other(net, attack, x, y, cap, seen)
                other_right[label] += right
                other_n[label] += counted
                other_outcomes[label] += outcome
                moves.other(label)
            labels += y.tolist()
            seen += x.shape[0]
            moves.done()
        if bar.total != seen:  # fewer examples than the limit: the bar ends full, at what was verified
            bar.total = seen
            bar.refresh()
    if result is None:
        raise DataError("expected at least one example to verify, got none")
    kept = torch.cat([*fooled_adv, *survived_adv])[:keep_adversarial] if fooled_adv or survived_adv else None
    return CascadeTally(
        result=result,
        other_right=other_right,
        other_n=other_n,
        other_outcomes=other_outcomes,
        check_x=check_x,
        check_y=check_y,
        check_adv=check_adv,
        adversarial=kept if kept is not None and kept.shape[0] else None,
        indices=sel.indices[:seen] if sel.indices is not None else list(range(seen)),
        labels=labels,
        check=sel.check[:seen] if sel.check is not None else [i < check_examples for i in range(seen)],
        sample=sel.sample,
    )


class _BarMoves:
    """Moves the verify bar within one batch: each attack an equal share, the l_p ones as they tick."""

    def __init__(self, bar: tqdm, seen: int, n: int, n_lp: int, n_other: int) -> None:
        self.bar, self.seen, self.n = bar, seen, n
        self.parts = max(n_lp + n_other, 1)
        self.lp_share = n_lp / self.parts
        self.finished = 0

    def _to(self, fraction: float, label: str) -> None:
        at = self.seen + int(self.n * min(fraction, 1.0))
        if at != self.bar.n:
            self.bar.n = at
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.refresh()

    def lp(self, label: str, done: float) -> None:
        """The l_p cascade ticked: the fraction ``done`` of it is finished (``label`` is running)."""
        self._to(done * self.lp_share, label)

    def other(self, label: str) -> None:
        """One attack outside the l_p threat model finished on this batch."""
        self.finished += 1
        self._to(self.lp_share + self.finished / self.parts, label)

    def done(self) -> None:
        """The batch is finished."""
        self.bar.n = self.seen + self.n
        self.bar.refresh()


def _in_check(check: list[bool] | None, check_examples: int, seen: int, n: int) -> torch.Tensor:
    """Which of the ``n`` examples from position ``seen`` on are in the check subset (the leading ones without ``check``)."""
    if check is not None:
        return torch.tensor(check[seen : seen + n], dtype=torch.bool)
    return torch.arange(seen, seen + n) < check_examples


def _lp_part(
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    lp_attacks: Sequence[Attack],
    kept: tuple[int, list[torch.Tensor], list[torch.Tensor]],
    check: torch.Tensor,
    on_progress: Callable[[str, float], None] | None = None,
) -> SuiteResult:
    """The l_p cascade on one batch (with ``x_adv`` if inputs are to be kept or ``check`` has any); some move to ``kept``."""
    keep, fooled, survived = kept
    want = sum(a.shape[0] for a in fooled) < keep or bool(check.any())
    part = run_suite(net, x, y, lp_attacks, keep_adversarial=want, on_progress=on_progress)
    if part.x_adv is not None:
        _harvest(part, keep, fooled, survived)
    return part


def _score_other(
    net: nn.Module, attack: Attack, x: torch.Tensor, y: torch.Tensor, cap: int | None, seen: int
) -> tuple[int, int, list[int]]:
    """Score an attack outside the l_p model on this batch, up to its cap of examples.

    Returns:
        ``(right, counted, outcome)``: examples scored right, examples that counted, and per
        example 1 right, 0 wrong, -1 not measured (beyond the cap, or no example could be built).
    """
    room = x.shape[0] if cap is None else max(0, min(x.shape[0], cap - seen))
    outcome = [-1] * x.shape[0]
    if room <= 0:
        return 0, 0, outcome
    right, counted = attack.score(net, x[:room], y[:room])
    outcome[:room] = [int(r) if c else -1 for r, c in zip(right.tolist(), counted.tolist(), strict=True)]
    return int(right.sum()), int(counted.sum()), outcome


def _harvest(part: SuiteResult, k: int, fooled: list[torch.Tensor], survived: list[torch.Tensor]) -> None:
    """Move up to ``k`` fooling and ``k`` surviving worst-case inputs of ``part`` into the lists."""
    if part.x_adv is None or not part.labels:
        return
    hit = torch.tensor([b not in ("", "clean") for b in part.broken_by], dtype=torch.bool)
    held = part.robust  # attacked by the whole cascade and still right
    for mask, bucket in ((hit, fooled), (held, survived)):
        room = k - sum(a.shape[0] for a in bucket)
        if room > 0 and bool(mask.any()):
            bucket.append(part.x_adv[mask][:room].to(torch.float32))
