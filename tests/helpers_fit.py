"""Helpers shared by the fit tests (train, fit_setup, fit_loop, fit_state): a quiet fit, equal weights."""

import torch

import harden


def fit(policy, run_dir, model=None, **kwargs):
    return harden.fit(model, policy, run_dir=run_dir, progress=False, **kwargs)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
