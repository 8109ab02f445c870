"""PV IV curves against pvlib (not our code): the curve Ironlink simulates for a healthy array
equals pvlib's single-diode solution (calcparams_desoto + i_from_v / singlediode, Lambert W)
at several irradiances, temperatures and layouts; and curves pvlib computes for a healthy
array, an open string, aged series resistance and aged shunt resistance are diagnosed as
such by `POST /analytics/pv/diagnose`. Bad curves are refused with a reason.

Usage: pv_pvlib.py HTTP TOKEN
"""
import sys

import numpy as np
import pvlib

from ironlink_api import Api

http, token = sys.argv[1:3]
api = Api(http, token).call

# The reference module (pvlib's CS5P-220M example parameters).
MODULE = dict(alpha_sc=0.004539, a_ref=2.6373, I_L_ref=5.114, I_o_ref=8.196e-10,
              R_sh_ref=381.68, R_s=1.065, EgRef=1.121, dEgdT=-0.0002677)


def params(g, t, rs=1.0, rsh=1.0):
    il, io, r_s, r_sh, a = pvlib.pvsystem.calcparams_desoto(g, t, **MODULE)
    return il, io, r_s * rs, r_sh * rsh, a


worst = 0.0
for g, t, s, p in ((1000, 25, 1, 1), (800, 45, 10, 3), (350, 10, 20, 2), (1100, 60, 6, 5)):
    status, got = api("POST", "/analytics/pv/simulate",
                      {"irradiance": g, "temperature": t, "modules": s, "strings": p, "points": 60})
    assert status == 200, got
    il, io, r_s, r_sh, a = params(g, t)
    v = np.array(got["voltage"]) / s
    want = pvlib.pvsystem.i_from_v(v, il, io, r_s, r_sh, a, method="lambertw") * p
    want = np.maximum(want, 0.0)
    err = np.max(np.abs(np.array(got["current"]) - want)) / (il * p)
    worst = max(worst, err)
    assert err < 1e-6, (g, t, err)
    sd = pvlib.pvsystem.singlediode(il, io, r_s, r_sh, a, method="lambertw")
    for ours, theirs in (("isc", sd["i_sc"] * p), ("voc", sd["v_oc"] * s), ("imp", sd["i_mp"] * p),
                         ("vmp", sd["v_mp"] * s), ("pmp", sd["p_mp"] * s * p)):
        rel = abs(got[ours] - float(theirs)) / abs(float(theirs))
        assert rel < 1e-4, (g, t, ours, got[ours], float(theirs))


def pvlib_curve(g, t, s, p, strings_on=None, rs=1.0, rsh=1.0, n=120):
    """The array's curve by pvlib: p strings of s identical modules, `strings_on` connected."""
    il, io, r_s, r_sh, a = params(g, t, rs, rsh)
    voc = float(pvlib.pvsystem.singlediode(il, io, r_s, r_sh, a)["v_oc"])
    rng = np.random.default_rng(int(g * 7 + t))
    vm = np.sort(rng.uniform(0, voc, n))  # a tracer's uneven steps
    i = np.maximum(pvlib.pvsystem.i_from_v(vm, il, io, r_s, r_sh, a, method="lambertw"), 0)
    on = p if strings_on is None else strings_on
    return [{"v": float(x * s), "i": float(y * on)} for x, y in zip(vm, i)]


cases = [
    ("normal", dict()),
    ("open_string", dict(strings_on=3)),
    ("series_resistance_ageing", dict(rs=5.0)),
    ("shunt_resistance_ageing", dict(rsh=0.03)),
]
for g, t in ((900, 40), (600, 25)):
    for want, kw in cases:
        body = {"irradiance": g, "temperature": t, "modules": 12, "strings": 4,
                "points": pvlib_curve(g, t, 12, 4, **kw)}
        status, got = api("POST", "/analytics/pv/diagnose", body)
        assert status == 200, got
        assert got["fault"] == want, (g, t, want, got)
        assert 0 < got["confidence"] <= 1 and abs(sum(got["votes"].values()) - 1) < 1e-9, got

# Refusals with a reason, never a crash.
status, got = api("POST", "/analytics/pv/diagnose",
                  {"irradiance": 800, "temperature": 25, "modules": 12, "strings": 4, "points": [{"v": 1, "i": 1}] * 3})
assert status in (400, 422) and got["message"], got
status, got = api("POST", "/analytics/pv/diagnose",
                  {"irradiance": 5, "temperature": 25, "modules": 12, "strings": 4, "points": [{"v": 1, "i": 1}] * 20})
assert status == 400 and "irradiance" in got["message"], got
print(f"simulated curves within {worst:.1e} of pvlib; {len(cases) * 2} pvlib curves diagnosed right")
