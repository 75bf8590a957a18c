"""Reference values for tests/test_harmonise.py from neuroCombat 0.2.12 (Fortin et al.).

    pip install neurocombat==0.2.12 && python tests/reference/combat_neurocombat.py

Writes combat_neurocombat.json: the input (features [N, D], site [N]) and neuroCombat's
harmonised data with and without empirical Bayes (no covariates).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from neuroCombat import neuroCombat

rng = np.random.default_rng(20260518)
n, d = 150, 8
site = rng.choice(["A", "B", "C"], n, p=[0.45, 0.35, 0.20])
x = rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0, d) + rng.normal(size=d)
offset = {"A": 0.0, "B": 1.5, "C": -2.0}
scale = {"A": 1.0, "B": 1.8, "C": 0.6}
x = np.stack([x[i] * scale[s] + offset[s] for i, s in enumerate(site)])
covars = pd.DataFrame({"site": site})
out = {
    "x": x.round(10).tolist(),
    "site": site.tolist(),
    "eb": neuroCombat(x.round(10).T, covars, "site")["data"].T.round(12).tolist(),
    "no_eb": neuroCombat(x.round(10).T, covars, "site", eb=False)["data"].T.round(12).tolist(),
}
Path(__file__).with_name("combat_neurocombat.json").write_text(json.dumps(out))
