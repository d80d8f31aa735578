"""A hand-written reference of MI's per-example Donsker-Varadhan estimate, shared by the MI tests."""

import math

import torch


def dv_reference(est, u, z):
    """I_i = mean_p [ s(i,i,p) - log( sum_{j != i} exp s(i,j,p) / (N - 1) ) ], with loops, in float64."""
    g, loc = est.global_features(z), est.local_features(u)  # (N, d), (N, P, d)
    n, locations, d = loc.shape
    out = []
    for i in range(n):
        terms = []
        for p in range(locations):
            pos = float(g[i] @ loc[i, p]) / math.sqrt(d)
            neg = sum(math.exp(float(g[i] @ loc[j, p]) / math.sqrt(d)) for j in range(n) if j != i)
            terms.append(pos - math.log(neg / (n - 1)))
        out.append(sum(terms) / locations)
    return torch.tensor(out, dtype=torch.float64)
