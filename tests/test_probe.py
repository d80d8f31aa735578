import torch
from torch.utils.data import DataLoader, TensorDataset

from harden.attacks.base import save_modes
from harden.policy import ThreatModel
from harden.probe import accuracy, clean_and_pgd_accuracy, clean_and_pgd_counts, probe_indices
from harden.testing import TinyCNN, synthetic_tensors

CPU = torch.device("cpu")


def test_counts_cover_all_data_and_probe_only_the_first_examples():
    model = TinyCNN(num_classes=3).train()
    model.head.eval()  # mixed modes: every one must come back as it was
    before = save_modes(model)
    data = synthetic_tensors(20)
    right, total, adv_right, adv_total = clean_and_pgd_counts(
        model, data, ThreatModel(eps=0.1), CPU, batch_size=8, probe_examples=11, probe_steps=2, seed=0
    )
    assert save_modes(model) == before
    assert (total, adv_total) == (20, 11)
    assert right == int(accuracy(model.eval(), *data).sum())
    assert 0 <= adv_right <= adv_total


def test_the_probe_is_seeded_and_leaves_the_global_rng_alone():
    model, data, threat = TinyCNN(num_classes=3), synthetic_tensors(16), ThreatModel(eps=0.2)
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    a = clean_and_pgd_accuracy(model, data, threat, CPU, batch_size=8, probe_examples=16, probe_steps=3, seed=1)
    assert torch.equal(torch.rand(2), expected)
    b = clean_and_pgd_accuracy(model, data, threat, CPU, batch_size=8, probe_examples=16, probe_steps=3, seed=1)
    assert a == b and set(a) == {"val_clean_acc", "val_pgd_acc"}


def test_no_probe_examples_gives_clean_accuracy_only():
    out = clean_and_pgd_accuracy(
        TinyCNN(num_classes=3),
        synthetic_tensors(8),
        ThreatModel(eps=0.1),
        CPU,
        batch_size=4,
        probe_examples=0,
        probe_steps=2,
        seed=0,
    )
    assert set(out) == {"val_clean_acc"} and 0.0 <= out["val_clean_acc"] <= 1.0


def test_accuracy_scores_non_finite_logits_wrong():
    class HalfNaN(torch.nn.Module):
        def forward(self, x):
            out = torch.zeros(x.shape[0], 3)
            out[::2] = float("nan")  # argmax of an all-NaN row is 0: the label below
            return out

    right = accuracy(HalfNaN(), torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))
    assert right.tolist() == [False, True, False, True]


def sorted_data(per_class=6, classes=3):
    """Class-sorted examples: the first ``per_class`` are all class 0."""
    y = torch.arange(classes).repeat_interleave(per_class)
    return torch.rand(len(y), 1, 8, 8), y


def test_the_probe_attacks_the_balanced_sample_not_the_first_examples():
    from harden.testing import ConstantClassifier

    data = sorted_data()
    sample = probe_indices(data, 6, seed=0)
    assert torch.bincount(data[1][sample], minlength=3).tolist() == [2, 2, 2]
    args = (ConstantClassifier(num_classes=3, label=0), data, ThreatModel(eps=0.1), CPU)
    kw = {"batch_size": 4, "probe_examples": 6, "probe_steps": 2, "seed": 0}  # batches straddle the sample
    # always class 0 and unmoved by any attack: right exactly on the attacked examples of class 0
    assert clean_and_pgd_counts(*args, **kw, probe=sample) == (6, 18, 2, 6)
    assert clean_and_pgd_counts(*args, **kw) == (6, 18, 6, 6)  # the first 6: all class 0


def test_probe_indices_is_seeded_and_reads_datasets_and_ordered_loaders():
    x, y = sorted_data()
    a = probe_indices(TensorDataset(x, y), 6, seed=1)
    assert torch.equal(a, probe_indices((x, y), 6, seed=1))
    assert torch.equal(a, probe_indices(DataLoader(TensorDataset(x, y), batch_size=4), 6, seed=1))
    assert probe_indices(DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True), 6, seed=1) is None
    assert probe_indices((x, y), 0, seed=1).tolist() == []
    assert probe_indices((x, y), 100, seed=1).tolist() == list(range(18))  # all of it
