# Reference values for survfuse's paired infinitesimal-jackknife (IJ) test of correlated
# Harrell C's: R survival::concordance(fit1, fit2, fit3, ...) on Cox models with different
# covariate sets fitted to the same subjects (lung, pbc, gbsg shipped with R's survival), its
# IJ variance matrix `var`, and for every pair of models the contrast
# d = C_i - C_j, var(d) = c' V c with c = e_i - e_j, z = d / sqrt(var(d)), p = 2 pnorm(-|z|).
# The risk scores (each fit's linear predictor) are stored with the numbers, so the test
# (tests/test_metrics_paired.py) needs no R. Run from the repository root:
#   Rscript tests/reference/paired_concordance.R [out.json]
# writes tests/reference/paired_concordance_r.json (numbers printed with 17 significant digits).
library(survival)

args <- commandArgs(trailingOnly = TRUE)
out_file <- if (length(args)) args[1] else "tests/reference/paired_concordance_r.json"

num <- function(x) paste0("[", paste(sprintf("%.17g", as.numeric(x)), collapse = ", "), "]")
mat <- function(m) paste0("[", paste(apply(m, 1, num), collapse = ", "), "]")
str1 <- function(x) paste0("\"", gsub("\"", "\\\\\"", x), "\"")

cases <- list()
add_case <- function(name, dataset, call_text, fits, time, event, cluster = NULL) {
  cf <- if (is.null(cluster)) do.call(concordance, unname(fits)) else
    do.call(concordance, c(unname(fits), list(cluster = cluster)))
  k <- length(fits)
  contrasts <- character(0)
  for (i in seq_len(k - 1)) for (j in (i + 1):k) {
    cv <- rep(0, k); cv[i] <- 1; cv[j] <- -1
    d <- sum(cv * cf$concordance)
    v <- as.numeric(t(cv) %*% cf$var %*% cv)
    z <- d / sqrt(v)
    contrasts <- c(contrasts, paste0(
      "{\"a\": ", i - 1, ", \"b\": ", j - 1,
      ", \"difference\": ", sprintf("%.17g", d), ", \"variance\": ", sprintf("%.17g", v),
      ", \"z\": ", sprintf("%.17g", z), ", \"p\": ", sprintf("%.17g", 2 * pnorm(-abs(z))), "}"))
  }
  risks <- sapply(fits, function(f) f$linear.predictors)
  entry <- c(
    paste0("\"name\": ", str1(name)),
    paste0("\"dataset\": ", str1(dataset)),
    paste0("\"call\": ", str1(call_text)),
    paste0("\"models\": [", paste(sapply(names(fits), str1), collapse = ", "), "]"),
    paste0("\"time\": ", num(time)),
    paste0("\"event\": ", num(as.integer(event))),
    paste0("\"risk\": ", mat(t(risks))),
    paste0("\"cluster\": ", if (is.null(cluster)) "null" else num(cluster)),
    paste0("\"concordance\": ", num(cf$concordance)),
    paste0("\"var\": ", mat(cf$var)),
    paste0("\"contrasts\": [", paste(contrasts, collapse = ", "), "]")
  )
  cases[[length(cases) + 1]] <<- paste0("{", paste(entry, collapse = ", "), "}")
  invisible(cf)
}

# lung: status 1 = censored, 2 = dead; complete cases of every covariate used.
l <- lung[complete.cases(lung[, c("time", "status", "age", "sex", "ph.ecog", "ph.karno", "inst")]), ]
lung_fits <- list(
  age_sex = coxph(Surv(time, status) ~ age + sex, data = l),
  age_sex_ecog = coxph(Surv(time, status) ~ age + sex + ph.ecog, data = l),
  karno = coxph(Surv(time, status) ~ ph.karno, data = l),
  ecog = coxph(Surv(time, status) ~ ph.ecog, data = l)  # coarse: 4 levels, many risk ties
)
add_case("lung", "lung",
  "concordance(coxph(~ age + sex), coxph(~ age + sex + ph.ecog), coxph(~ ph.karno), coxph(~ ph.ecog)) on lung complete cases",
  lung_fits, l$time, l$status == 2)
add_case("lung_cluster_inst", "lung",
  "the same fits, concordance(..., cluster = inst)",
  lung_fits, l$time, l$status == 2, cluster = l$inst)

# pbc: the 312 randomised patients; status 2 = death (transplant 1 counts as censored).
p <- pbc[1:312, ]
p <- p[complete.cases(p[, c("time", "status", "bili", "age", "albumin", "edema", "protime", "stage")]), ]
p$death <- as.integer(p$status == 2)
pbc_fits <- list(
  log_bili = coxph(Surv(time, death) ~ log(bili), data = p),
  mayo = coxph(Surv(time, death) ~ log(bili) + age + log(albumin) + edema + log(protime), data = p),
  stage = coxph(Surv(time, death) ~ stage, data = p)  # coarse: 4 levels
)
add_case("pbc", "pbc",
  "concordance(coxph(~ log(bili)), coxph(~ log(bili) + age + log(albumin) + edema + log(protime)), coxph(~ stage)) on pbc[1:312] complete cases, death = status == 2",
  pbc_fits, p$time, p$death == 1)

# gbsg: rfstime in days, status 1 = recurrence or death.
g <- gbsg
gbsg_fits <- list(
  nodes = coxph(Surv(rfstime, status) ~ nodes, data = g),
  full = coxph(Surv(rfstime, status) ~ age + meno + size + grade + nodes + pgr + er + hormon, data = g),
  grade = coxph(Surv(rfstime, status) ~ grade, data = g)  # coarse: 3 levels
)
add_case("gbsg", "gbsg",
  "concordance(coxph(~ nodes), coxph(~ age + meno + size + grade + nodes + pgr + er + hormon), coxph(~ grade)) on gbsg",
  gbsg_fits, g$rfstime, g$status == 1)

out <- paste0("{\n\"r_version\": ", str1(R.version.string),
  ",\n\"survival_version\": ", str1(as.character(packageVersion("survival"))),
  ",\n\"script\": \"tests/reference/paired_concordance.R\"",
  ",\n\"cases\": [\n", paste(unlist(cases), collapse = ",\n"), "\n]\n}\n")
writeLines(out, out_file)
cat("wrote", out_file, "with", length(cases), "cases\n")
