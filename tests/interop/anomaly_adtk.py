"""Point anomalies next to adtk (not our code) on the same labelled data: simulator-like
signals (sine with noise, random walks, a drifting trend with a daily cycle) with injected
spikes; Ironlink's ONE pooled model (`POST /analytics/anomaly/detect`) against adtk's
detectors fitted per series. Prints precision / recall / F1 of each; Ironlink must find at
least 90 % of the spikes, keep its false alarms near its sensitivity level, and score an F1
no worse than adtk's best detector on the same data.

Usage: anomaly_adtk.py HTTP TOKEN
"""
import sys
import warnings

import numpy as np
import pandas as pd
from adtk.data import validate_series
from adtk.detector import (AutoregressionAD, GeneralizedESDTestAD, InterQuartileRangeAD,
                           PersistAD, QuantileAD)

from ironlink_api import Api

warnings.filterwarnings("ignore")
http, token = sys.argv[1:3]
api = Api(http, token)


rng = np.random.default_rng(21)
N, TRAIN = 3000, 2000
signals, labels = [], []
for k in range(12):
    t = np.arange(N)
    kind = k % 3
    if kind == 0:
        x = 20 + 5 * np.sin(t / rng.uniform(20, 60)) + rng.normal(0, 0.3, N)
    elif kind == 1:
        x = 100 + np.cumsum(rng.normal(0, 0.3, N))
    else:
        x = 50 + 0.01 * t + 3 * np.sin(2 * np.pi * t / 1440 * 10) + rng.normal(0, 0.3, N)
    spikes = np.sort(rng.choice(np.arange(TRAIN + 20, N - 5), 12, replace=False))
    for s in spikes:
        x[s] += rng.choice([-1, 1]) * rng.uniform(2.5, 5.0)
    signals.append(x)
    labels.append(set(int(s) for s in spikes))


def score(found):
    tp = fp = fn = 0
    for f, want in zip(found, labels):
        f = {i for i in f if i >= TRAIN}
        tp += len(f & want)
        fp += len(f - want)
        fn += len(want - f)
    p = tp / max(tp + fp, 1)
    r = tp / max(tp + fn, 1)
    return p, r, 2 * p * r / max(p + r, 1e-12), fp


got = api("POST", "/analytics/anomaly/detect",
          {"series": [s.tolist() for s in signals], "train_points": TRAIN, "sensitivity": "1%"})
ours = score(got["anomalies"])

detectors = {
    "AutoregressionAD(n_steps=16, c=3)": lambda: AutoregressionAD(n_steps=16, step_size=1, c=3.0),
    "PersistAD(c=3)": lambda: PersistAD(c=3.0, side="both"),
    "InterQuartileRangeAD(c=3)": lambda: InterQuartileRangeAD(c=3.0),
    "QuantileAD(0.005, 0.995)": lambda: QuantileAD(low=0.005, high=0.995),
    "GeneralizedESDTestAD(alpha=0.3)": lambda: GeneralizedESDTestAD(alpha=0.3),
}
idx = pd.date_range("2026-01-01", periods=N, freq="min")
results = {"ironlink (pooled, 1%)": ours}
for name, make in detectors.items():
    found = []
    for x in signals:
        s = validate_series(pd.Series(x, index=idx))
        d = make()
        d.fit(s.iloc[:TRAIN])
        flags = d.detect(s).fillna(False).astype(bool).to_numpy()
        found.append(np.flatnonzero(flags).tolist())
    results[name] = score(found)
for name, (p, r, f1, fp) in results.items():
    print(f"{name:<36} precision {p:.3f} recall {r:.3f} F1 {f1:.3f} false alarms {fp}")
best_adtk = max(v[2] for k, v in results.items() if not k.startswith("ironlink"))
p, r, f1, fp = ours
assert r >= 0.9, f"recall {r}"
ordinary = len(signals) * (N - TRAIN) - sum(len(l) for l in labels)
assert fp <= 0.025 * ordinary, f"{fp} false alarms in {ordinary} ordinary points"
assert f1 >= best_adtk, f"F1 {f1:.3f} below adtk's best {best_adtk:.3f}"
