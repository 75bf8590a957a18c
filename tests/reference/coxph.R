# Reference numbers for survfuse.survival.CoxPH / cox_log_likelihood / breslow_baseline.
# Run from the repository root:  Rscript tests/reference/coxph.R
# Writes tests/reference/coxph_r.json (R version, survival version and the exact calls included).
#
# Data sets (R survival package, complete cases on the listed covariates):
#   lung:    Surv(time, status == 2) ~ age + sex + ph.ecog + ph.karno + pat.karno + meal.cal + wt.loss
#   veteran: Surv(time, status) ~ trt + karno + diagtime + age + prior + celltype
#            (celltype as treatment-coded dummies: smallcell, adeno, large vs squamous)
#   pbc:     Surv(time, status == 2) ~ age + edema + log(bili) + log(albumin) + log(protime)
#            (death as the event; transplant counted as censored)
#   gbsg:    Surv(rfstime, status) ~ age + meno + size + grade + nodes + pgr + er + hormon
# Each is fitted with ties = "efron" and ties = "breslow"; lung also with an L2 penalty
# ridge(..., theta = 2, scale = FALSE) (penalty theta/2 * sum(beta^2)).
library(survival)

ctrl <- coxph.control(eps = 1e-12, toler.chol = 1e-13, iter.max = 100)

source("tests/reference/json_helpers.R")  # num(), str_json(), obj()

datasets <- list(
  lung = list(
    data = survival::lung,
    formula = Surv(time, status == 2) ~ age + sex + ph.ecog + ph.karno + pat.karno + meal.cal + wt.loss
  ),
  veteran = list(
    data = survival::veteran,
    formula = Surv(time, status) ~ trt + karno + diagtime + age + prior + celltype
  ),
  pbc = list(
    data = survival::pbc,
    formula = Surv(time, status == 2) ~ age + edema + log(bili) + log(albumin) + log(protime)
  ),
  gbsg = list(
    data = survival::gbsg,
    formula = Surv(rfstime, status) ~ age + meno + size + grade + nodes + pgr + er + hormon
  )
)

out <- c()
for (name in names(datasets)) {
  d <- datasets[[name]]
  mf <- model.frame(d$formula, data = d$data, na.action = na.omit)  # complete cases
  y <- model.response(mf)
  X <- model.matrix(d$formula, mf)[, -1, drop = FALSE]
  fits <- c()
  for (ties in c("efron", "breslow")) {
    fit <- coxph(d$formula, data = d$data, ties = ties, control = ctrl, na.action = na.omit)
    bh <- basehaz(fit, centered = FALSE)
    call_txt <- paste(deparse(fit$call, width.cutoff = 500), collapse = " ")
    fits[ties] <- obj(list(
      call = str_json(paste0(call_txt, " with control = coxph.control(eps = 1e-12, toler.chol = 1e-13, iter.max = 100)")),
      coef = num(coef(fit)),
      se = num(sqrt(diag(fit$var))),
      loglik = num(fit$loglik),
      iter = num(fit$iter),
      basehaz_time = num(bh$time),
      basehaz_hazard = num(bh$hazard),
      basehaz_call = str_json("basehaz(fit, centered = FALSE)")
    ))
  }
  items <- list(
    covariates = paste0("[", paste(str_json(colnames(X)), collapse = ", "), "]"),
    n = num(nrow(X)),
    time = num(y[, 1]),
    event = num(y[, 2]),
    X = paste0("[", paste(apply(X, 1, num), collapse = ", "), "]"),
    formula = str_json(paste(deparse(d$formula, width.cutoff = 500), collapse = " ")),
    efron = fits["efron"],
    breslow = fits["breslow"]
  )
  if (name == "lung") {
    cols <- colnames(X)
    rf <- as.formula(paste0("Surv(time, status == 2) ~ ridge(", paste(cols, collapse = ", "),
                            ", theta = 2, scale = FALSE)"))
    rfit <- coxph(rf, data = d$data, ties = "efron", control = ctrl, na.action = na.omit)
    items$ridge_efron <- obj(list(
      call = str_json(paste(deparse(rf, width.cutoff = 500), collapse = " ")),
      theta = num(2),
      coef = num(coef(rfit)),
      se = num(sqrt(diag(rfit$var))),
      loglik = num(rfit$loglik)
    ))
  }
  out[name] <- obj(items)
}

meta <- obj(list(
  r_version = str_json(R.version.string),
  survival_version = str_json(as.character(packageVersion("survival"))),
  script = str_json("tests/reference/coxph.R"),
  note = str_json("se = sqrt(diag(fit$var)); loglik = fit$loglik (null, final)")
))
json <- paste0("{", str_json("meta"), ": ", meta, ", ",
               paste(paste0(str_json(names(out)), ": ", out), collapse = ", "), "}\n")
writeLines(json, "tests/reference/coxph_r.json", sep = "")
cat("wrote tests/reference/coxph_r.json\n")
