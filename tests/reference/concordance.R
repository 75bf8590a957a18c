# Reference values for survfuse.metrics: Harrell's C (counts, IJ variance, influence) from
# R survival::concordance(..., reverse = TRUE). Run from the repository root:
#   Rscript tests/reference/concordance.R
# writes tests/reference/concordance_r.json (numbers printed with 17 significant digits).
library(survival)

num <- function(x) paste0("[", paste(sprintf("%.17g", as.numeric(x)), collapse = ", "), "]")
str1 <- function(x) paste0("\"", gsub("\"", "\\\\\"", x), "\"")

cases <- list()
add_case <- function(name, dataset, call_text, time, event, risk, cluster = NULL) {
  ok <- !(is.na(time) | is.na(event) | is.na(risk))
  time <- time[ok]; event <- event[ok]; risk <- risk[ok]
  if (!is.null(cluster)) cluster <- cluster[ok]
  if (is.null(cluster)) {
    fit <- concordance(Surv(time, event) ~ risk, reverse = TRUE, influence = 1)
  } else {
    fit <- concordance(Surv(time, event) ~ risk, reverse = TRUE, influence = 1,
                       cluster = cluster)
  }
  entry <- c(
    paste0("\"name\": ", str1(name)),
    paste0("\"dataset\": ", str1(dataset)),
    paste0("\"call\": ", str1(call_text)),
    paste0("\"time\": ", num(time)),
    paste0("\"event\": ", num(as.integer(event))),
    paste0("\"risk\": ", num(risk)),
    paste0("\"cluster\": ", if (is.null(cluster)) "null" else num(cluster)),
    paste0("\"concordance\": ", sprintf("%.17g", fit$concordance)),
    paste0("\"count\": {", paste(sprintf("\"%s\": %.17g", names(fit$count), fit$count),
                                 collapse = ", "), "}"),
    paste0("\"var\": ", sprintf("%.17g", fit$var)),
    paste0("\"dfbeta\": ", if (is.null(cluster)) num(fit$dfbeta) else "null")
  )
  cases[[length(cases) + 1]] <<- paste0("{", paste(entry, collapse = ", "), "}")
  invisible(fit)
}

# lung: status 1 = censored, 2 = dead
l <- lung
add_case("lung_age", "lung", "concordance(Surv(time, status == 2) ~ age, data = lung, reverse = TRUE, influence = 1)",
         l$time, l$status == 2, l$age)
add_case("lung_ph_ecog", "lung", "concordance(Surv(time, status == 2) ~ ph.ecog, data = lung, reverse = TRUE, influence = 1) [coarse, 4 levels; NA rows dropped]",
         l$time, l$status == 2, l$ph.ecog)
lfit <- coxph(Surv(time, status) ~ age + sex + ph.ecog + ph.karno, data = l)
lp <- predict(lfit, newdata = l, type = "lp")
add_case("lung_coxph_lp", "lung", "concordance(Surv(time, status == 2) ~ predict(coxph(Surv(time, status) ~ age + sex + ph.ecog + ph.karno), type = 'lp'), reverse = TRUE) [NA rows dropped]",
         l$time, l$status == 2, lp)
add_case("lung_age_cluster_inst", "lung", "concordance(Surv(time, status == 2) ~ age, data = lung, reverse = TRUE, cluster = inst) [NA inst dropped]",
         l$time[!is.na(l$inst)], (l$status == 2)[!is.na(l$inst)], l$age[!is.na(l$inst)],
         cluster = l$inst[!is.na(l$inst)])
# veteran: higher Karnofsky = better, so risk = -karno (coarse: 12 levels)
v <- veteran
add_case("veteran_neg_karno", "veteran", "concordance(Surv(time, status) ~ I(-karno), data = veteran, reverse = TRUE)",
         v$time, v$status == 1, -v$karno)
add_case("veteran_celltype", "veteran", "concordance(Surv(time, status) ~ as.integer(celltype), data = veteran, reverse = TRUE) [coarse, 4 levels]",
         v$time, v$status == 1, as.integer(v$celltype))
# pbc: status 2 = death (transplant 1 treated as censored)
p <- pbc
add_case("pbc_log_bili", "pbc", "concordance(Surv(time, status == 2) ~ log(bili), data = pbc, reverse = TRUE)",
         p$time, p$status == 2, log(p$bili))
add_case("pbc_stage", "pbc", "concordance(Surv(time, status == 2) ~ stage, data = pbc, reverse = TRUE) [coarse, 4 levels; NA rows dropped]",
         p$time, p$status == 2, p$stage)
add_case("pbc_edema", "pbc", "concordance(Surv(time, status == 2) ~ edema, data = pbc, reverse = TRUE) [coarse, 3 levels, heavily tied]",
         p$time, p$status == 2, p$edema)
# gbsg: rfstime in days, status 1 = recurrence or death
g <- gbsg
add_case("gbsg_nodes", "gbsg", "concordance(Surv(rfstime, status) ~ nodes, data = gbsg, reverse = TRUE)",
         g$rfstime, g$status == 1, g$nodes)
add_case("gbsg_grade", "gbsg", "concordance(Surv(rfstime, status) ~ grade, data = gbsg, reverse = TRUE) [coarse, 3 levels, heavily tied]",
         g$rfstime, g$status == 1, g$grade)

# Paired comparison of two correlated C's on the same subjects (lung complete cases):
# R's concordance(fit1, fit2) covariance is crossprod of the per-subject dfbeta columns.
cc <- l[complete.cases(l[, c("time", "status", "age", "ph.ecog")]), ]
f1 <- concordance(Surv(time, status == 2) ~ age, data = cc, reverse = TRUE, influence = 1)
f2 <- concordance(Surv(time, status == 2) ~ ph.ecog, data = cc, reverse = TRUE, influence = 1)
vmat <- crossprod(cbind(f1$dfbeta, f2$dfbeta))
paired <- paste0("{\"name\": \"lung_age_vs_ph_ecog\", \"call\": ",
  str1("f1 <- concordance(Surv(time, status == 2) ~ age, reverse = TRUE, influence = 1); f2 <- ... ~ ph.ecog; crossprod(cbind(f1$dfbeta, f2$dfbeta)) on lung complete cases"),
  ", \"time\": ", num(cc$time), ", \"event\": ", num(as.integer(cc$status == 2)),
  ", \"risk_a\": ", num(cc$age), ", \"risk_b\": ", num(cc$ph.ecog),
  ", \"c_a\": ", sprintf("%.17g", f1$concordance), ", \"c_b\": ", sprintf("%.17g", f2$concordance),
  ", \"var_a\": ", sprintf("%.17g", vmat[1, 1]), ", \"var_b\": ", sprintf("%.17g", vmat[2, 2]),
  ", \"cov_ab\": ", sprintf("%.17g", vmat[1, 2]), "}")

# Uno-type C in R (timewt = "n/G2", ymax = tau) for the documented difference to sksurv/Uno.
tau <- 600
u <- concordance(Surv(time, status == 2) ~ age, data = l, reverse = TRUE, timewt = "n/G2", ymax = tau)
uno <- paste0("{\"name\": \"lung_age_n_G2\", \"call\": ",
  str1("concordance(Surv(time, status == 2) ~ age, data = lung, reverse = TRUE, timewt = 'n/G2', ymax = 600)"),
  ", \"tau\": ", tau, ", \"concordance\": ", sprintf("%.17g", u$concordance), "}")

out <- paste0("{\n\"r_version\": ", str1(R.version.string),
  ",\n\"survival_version\": ", str1(as.character(packageVersion("survival"))),
  ",\n\"script\": \"tests/reference/concordance.R\"",
  ",\n\"cases\": [\n", paste(unlist(cases), collapse = ",\n"), "\n]",
  ",\n\"paired\": ", paired, ",\n\"n_G2\": ", uno, "\n}\n")
writeLines(out, "tests/reference/concordance_r.json")
cat("wrote tests/reference/concordance_r.json with", length(cases), "cases\n")
