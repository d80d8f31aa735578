import torch

from harden.attacks.base import save_modes
from harden.policy import ThreatModel
from harden.probe import accuracy, clean_and_pgd_accuracy, clean_and_pgd_counts
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
