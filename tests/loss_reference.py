"""A deliberately simple, loop-based implementation of FACTS sections 1-2, independent of the package's code.

Plain Python floats and ``math`` only: no torch reductions, no vectorisation, so it cannot share a bug with the
vectorised losses it checks.
"""

from __future__ import annotations

import math


def softmax(values: list[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def kd_value(student: list[float], teacher: list[float], label: int | None, temperature: float, alpha: float) -> float:
    """``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)`` for one position."""
    p_t = softmax([t / temperature for t in teacher])
    p_s = softmax([s / temperature for s in student])
    kl = sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s) if pt > 0)
    value = alpha * temperature**2 * kl
    if alpha < 1:
        value += (1 - alpha) * -math.log(softmax(student)[label])
    return value


def per_sample_kd(student, teacher, target, temperature: float, alpha: float) -> list[float]:
    """Per-sample KD values for nested lists: ``student[b][c]`` or ``student[b][c][v]`` (voxels flattened)."""
    out = []
    for b in range(len(student)):
        num_classes = len(student[b])
        if isinstance(student[b][0], list):
            num_vox = len(student[b][0])
            values = []
            for v in range(num_vox):
                s = [student[b][c][v] for c in range(num_classes)]
                t = [teacher[b][c][v] for c in range(num_classes)]
                y = None if target is None else int(target[b][v])
                values.append(kd_value(s, t, y, temperature, alpha))
            out.append(sum(values) / num_vox)
        else:
            y = None if target is None else int(target[b])
            out.append(kd_value(student[b], teacher[b], y, temperature, alpha))
    return out


class ReferenceGroupDRO:
    """The online group-DRO state of Sagawa et al. (reference code ``loss.py``), one group at a time.

    ``absent_groups="zero"`` is the reference rule (an absent group's loss is 0 in the update); with ``"ema"`` an
    absent group enters the update with its running loss (before it was ever seen: the mean of the present groups).
    """

    def __init__(
        self,
        num_groups,
        step_size=0.01,
        adjustment=0.0,
        group_counts=None,
        normalize_loss=False,
        gamma=0.1,
        absent_groups="ema",
    ):
        self.num_groups = num_groups
        self.absent_groups = absent_groups
        self.step_size = step_size
        adj = [adjustment] * num_groups if isinstance(adjustment, (int, float)) else list(adjustment)
        self.adj_term = [(adj[g] / math.sqrt(group_counts[g]) if adj[g] > 0 else 0.0) for g in range(num_groups)]
        self.normalize_loss = normalize_loss
        self.gamma = gamma
        self.q = [1.0 / num_groups] * num_groups
        self.ema = [0.0] * num_groups
        self.ema_init = [False] * num_groups

    def group_means(self, losses, groups):
        sums = [0.0] * self.num_groups
        counts = [0] * self.num_groups
        for loss, g in zip(losses, groups):
            sums[g] += loss
            counts[g] += 1
        return [sums[g] / counts[g] if counts[g] else 0.0 for g in range(self.num_groups)], counts

    def step(self, losses, groups, update=True):
        """Returns the robust loss after (optionally) updating the weights."""
        means, counts = self.group_means(losses, groups)
        adjusted = [means[g] + self.adj_term[g] for g in range(self.num_groups)]
        if update:
            present = [means[g] for g in range(self.num_groups) if counts[g]]
            scores = []
            for g in range(self.num_groups):
                if counts[g] or self.absent_groups == "zero":
                    score = means[g]
                else:  # "ema": an absent group enters the update with its running loss
                    score = self.ema[g] if self.ema_init[g] else sum(present) / len(present)
                scores.append(score + self.adj_term[g])
            if self.normalize_loss:
                total = sum(scores)
                if total != 0:
                    scores = [s / total for s in scores]
            new_q = [self.q[g] * math.exp(self.step_size * scores[g]) for g in range(self.num_groups)]
            total = sum(new_q)
            self.q = [w / total for w in new_q]
            for g in range(self.num_groups):
                if not self.ema_init[g]:
                    self.ema[g] = means[g]
                elif counts[g] > 0:
                    self.ema[g] = (1 - self.gamma) * self.ema[g] + self.gamma * means[g]
                self.ema_init[g] = self.ema_init[g] or counts[g] > 0
        return sum(self.q[g] * adjusted[g] for g in range(self.num_groups))
