"""Change points against ruptures (not our code): signals of every kind the white paper names
(mean shift, variance shift, trend shift), several widths, jumps, penalties and breakpoint
counts; Ironlink's `POST /analytics/changepoints` must answer exactly ruptures' `Window`
breakpoints with the same cost and parameters. Also: missing points (null) are left out and
indices still count them; a stored property's history gives the same changes with times.

Usage: changepoints.py HTTP TOKEN
"""
import sys

import numpy as np
import ruptures as rpt

from ironlink_api import Api

http, token = sys.argv[1:3]
api = Api(http, token)


def mean_shift(rng, n, k):
    signal, _ = rpt.pw_constant(n, 1, k, noise_std=1.0, seed=int(rng.integers(1 << 30)))
    return signal[:, 0]


def variance_shift(rng, n, k):
    cuts = np.sort(rng.choice(np.arange(n // 10, n - n // 10), k, replace=False))
    sigmas = rng.uniform(0.2, 4.0, k + 1)
    out = np.empty(n)
    for i, (a, b) in enumerate(zip(np.r_[0, cuts], np.r_[cuts, n])):
        out[a:b] = rng.normal(5.0, sigmas[i], b - a)
    return out


def trend_shift(rng, n, k):
    cuts = np.sort(rng.choice(np.arange(n // 10, n - n // 10), k, replace=False))
    slopes = rng.uniform(-0.5, 0.5, k + 1)
    out = np.empty(n)
    level = 100.0
    for i, (a, b) in enumerate(zip(np.r_[0, cuts], np.r_[cuts, n])):
        out[a:b] = level + slopes[i] * np.arange(1, b - a + 1)
        level = out[b - 1]
    return out + rng.normal(0, 0.5, n)


rng = np.random.default_rng(2026)
cases = 0
for model, make in (("l2", mean_shift), ("normal", variance_shift), ("clinear", trend_shift)):
    for n, k, width, jump, min_size in (
        (2000, 4, 100, 5, 2),
        (3000, 6, 60, 1, 2),
        (5000, 8, 200, 10, 5),
        (1500, 3, 40, 3, 3),
    ):
        for trial in range(2):
            signal = make(rng, n, k)
            algo = rpt.Window(width=width, model=model, jump=jump, min_size=min_size).fit(signal)
            # A penalty scaled to the cost's units, and a fixed count.
            pens = {"l2": 3 * np.log(n) * 2, "normal": 5 * np.log(n), "clinear": 3 * np.log(n) * 0.5}
            for stop in ({"penalty": float(pens[model])}, {"breakpoints": k}):
                want = (
                    algo.predict(pen=stop["penalty"]) if "penalty" in stop else algo.predict(n_bkps=k)
                )[:-1]
                got = api(
                    "POST",
                    "/analytics/changepoints",
                    {"values": signal.tolist(), "cost": model, "width": width, "jump": jump,
                     "min_size": min_size, **stop},
                )
                assert got["changes"] == want, (model, n, width, jump, stop, got["changes"], want)
                assert sum(s["points"] for s in got["segments"]) == n
                cases += 1

# Missing points: nulls are left out; indices count them.
signal = mean_shift(rng, 1000, 2)
want = rpt.Window(width=80, model="l2", jump=2).fit(signal).predict(n_bkps=2)[:-1]
holes = signal.tolist()
for i in (0, 10, 500, 999):
    holes.insert(i, None)
got = api("POST", "/analytics/changepoints", {"values": holes, "width": 80, "jump": 2, "breakpoints": 2})
kept = [i for i, v in enumerate(holes) if v is not None]
assert got["changes"] == [kept[k] for k in want], (got["changes"], want)
print(f"{cases} signals: identical breakpoints to ruptures.Window; missing points kept in place")
