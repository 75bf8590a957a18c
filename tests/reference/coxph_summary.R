# Reference numbers for survfuse.survival.CoxPH.summary (lifelines' CoxPHFitter.summary columns).
# Run from the repository root:  Rscript tests/reference/coxph_summary.R
# Writes tests/reference/coxph_summary_r.json (R version, survival version and the calls included).
#
# The data are those of tests/reference/coxph.R (R survival package, complete cases), fitted
# with ties = "efron":
#   pbc:  Surv(time, status == 2) ~ age + edema + log(bili) + log(albumin) + log(protime)
#   lung: Surv(time, status == 2) ~ age + sex + ph.ecog + ph.karno + pat.karno + meal.cal + wt.loss
# Columns, from summary(fit) and confint(fit):
#   coef, exp(coef), se(coef), z, Pr(>|z|)           <- summary(fit)$coefficients
#   lower .95, upper .95 of exp(coef)                 <- summary(fit)$conf.int
#   2.5 %, 97.5 % of coef (Wald, coef +- qnorm(0.975) se) <- confint(fit)
library(survival)

ctrl <- coxph.control(eps = 1e-12, toler.chol = 1e-13, iter.max = 100)

source("tests/reference/json_helpers.R")  # num, str_json, obj

datasets <- list(
  pbc = list(
    data = survival::pbc,
    formula = Surv(time, status == 2) ~ age + edema + log(bili) + log(albumin) + log(protime)
  ),
  lung = list(
    data = survival::lung,
    formula = Surv(time, status == 2) ~ age + sex + ph.ecog + ph.karno + pat.karno + meal.cal + wt.loss
  )
)

out <- c()
for (name in names(datasets)) {
  d <- datasets[[name]]
  fit <- coxph(d$formula, data = d$data, ties = "efron", control = ctrl, na.action = na.omit)
  s <- summary(fit)
  cf <- s$coefficients
  ci <- s$conf.int
  wald <- confint(fit)
  out[name] <- obj(list(
    call = str_json(paste0(paste(deparse(fit$call, width.cutoff = 500), collapse = " "),
                           " with control = coxph.control(eps = 1e-12, toler.chol = 1e-13, iter.max = 100)")),
    covariates = paste0("[", paste(str_json(rownames(cf)), collapse = ", "), "]"),
    n = num(fit$n),
    coef = num(cf[, "coef"]),
    exp_coef = num(cf[, "exp(coef)"]),
    se_coef = num(cf[, "se(coef)"]),
    z = num(cf[, "z"]),
    p = num(cf[, "Pr(>|z|)"]),
    exp_coef_lower_95 = num(ci[, "lower .95"]),
    exp_coef_upper_95 = num(ci[, "upper .95"]),
    coef_lower_95 = num(wald[, 1]),
    coef_upper_95 = num(wald[, 2])
  ))
}

meta <- obj(list(
  r_version = str_json(R.version.string),
  survival_version = str_json(as.character(packageVersion("survival"))),
  script = str_json("tests/reference/coxph_summary.R"),
  note = str_json("summary(fit)$coefficients, summary(fit)$conf.int, confint(fit); data as in coxph.R")
))
json <- paste0("{", str_json("meta"), ": ", meta, ", ",
               paste(paste0(str_json(names(out)), ": ", out), collapse = ", "), "}\n")
writeLines(json, "tests/reference/coxph_summary_r.json", sep = "")
cat("wrote tests/reference/coxph_summary_r.json\n")
