"""Bayesian fit (Pyro SVI) with the heterogeneity report and its plots.

Shows: a variational fit of two normal random coefficients and two fixed ones on the electricity data, its
heterogeneity table (mean, sd, CV, share with the opposite sign, quantiles, 90% credible intervals) and the PNG
plots (population densities with 90% bands, a forest plot, individual posterior means against the population
density) in examples-out/bayes/.
Takes: about 70 s on 2 CPU cores (66 s of CPU time: the marginal guide, its trust check and the plots' posterior draws).
Prints: the summary, the heterogeneity table, "pf mean -0.9" (about), and the paths of the plots.
"""

import mixlogit as ml

df = ml.datasets.load_electricity()
data = ml.ChoiceData.from_long(df, choice="choice", alt="alt", situation="chid", panel="id")
model = ml.MixedLogit(random={"pf": "normal", "loc": "normal"}, fixed=["cl", "wk", "tod", "seas"])
res = model.fit(data, method="svi", steps=1500, seed=0)

print(res.summary())
het = ml.heterogeneity(res)
print(het[["mean", "mean.lo", "mean.hi", "sd", "sd.lo", "sd.hi", "share_opposite"]].round(3).to_string())
print(f"pf mean {het.loc['pf', 'mean']:.3f}")
for name, path in ml.plot_heterogeneity(res, "examples-out/bayes", data=data, overwrite=True).items():
    print(f"{name}: {path}")
