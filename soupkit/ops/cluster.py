"""k-means on rank-1 units (LoRA-LEGO), seeded and device independent."""

from __future__ import annotations

import torch


def refill_empty_clusters(assign: torch.Tensor, own_distance: torch.Tensor, k: int) -> None:
    """Give each empty cluster its own point, in place: the worst-served points, in order, taken only
    from clusters that keep at least one member. Possible whenever N >= k (N - #non-empty spare
    points >= #empty clusters), so afterwards every cluster of 0..k-1 has a member.

    Args:
        assign: (N,) cluster index per point (modified).
        own_distance: (N,) distance of each point to its assigned centre.
    """
    counts = torch.bincount(assign, minlength=k).tolist()
    empty = [c for c in range(k) if counts[c] == 0]
    if not empty:
        return
    for point in torch.argsort(own_distance, descending=True, stable=True).tolist():
        donor = int(assign[point])
        if counts[donor] > 1:
            target = empty.pop()
            assign[point] = target
            counts[donor] -= 1
            counts[target] += 1
            if not empty:
                return
    raise ValueError(f"k-means needs at least k={k} points, got {assign.numel()}")


def kmeans(points: torch.Tensor, k: int, generator: torch.Generator, max_iter: int = 100) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding from ``generator`` (CPU draws: device independent).

    Args:
        points: (N, D) float tensor, N >= k >= 1.
    Returns:
        (N,) cluster index of each point, every cluster non-empty.
    """
    n = points.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    nearest = (points - points[chosen[0]]).square().sum(dim=1)
    while len(chosen) < k:
        weights = nearest.double().cpu().clamp_min(0)
        if float(weights.sum()) > 0:
            idx = int(torch.multinomial(weights, 1, generator=generator))
        else:  # every remaining point coincides with a centre: take the first unused one
            idx = next(i for i in range(n) if i not in chosen)
        chosen.append(idx)
        nearest = torch.minimum(nearest, (points - points[idx]).square().sum(dim=1))
    centres = points[chosen].clone()
    assign = torch.full((n,), -1, dtype=torch.long, device=points.device)
    for _ in range(max_iter):
        dist = torch.cdist(points, centres).square()
        new = dist.argmin(dim=1)
        refill_empty_clusters(new, dist.gather(1, new[:, None]).squeeze(1), k)
        if torch.equal(new, assign):
            break
        assign = new
        member = torch.nn.functional.one_hot(assign, k).T.to(points.dtype)  # (k, N)
        centres = (member @ points) / member.sum(dim=1, keepdim=True)
    return assign
