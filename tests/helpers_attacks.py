"""Helpers shared by the attack tests: seeded training of tiny models."""

import torch
import torch.nn.functional as F


def fit(model, x, y, epochs, lr, batch=64, seed=0):
    """Adam on ``(x, y)`` for ``epochs`` seeded epochs (the global RNG untouched); the model in eval mode."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: one thread is fastest, and immune to a busy machine
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            opt = torch.optim.Adam(model.parameters(), lr=lr)
            model.train()
            for _ in range(epochs):
                perm = torch.randperm(len(x))
                for i in range(0, len(x), batch):
                    idx = perm[i : i + batch]
                    opt.zero_grad()
                    F.cross_entropy(model(x[idx]), y[idx]).backward()
                    opt.step()
    finally:
        torch.set_num_threads(threads)
    model.zero_grad(set_to_none=True)
    return model.eval()

