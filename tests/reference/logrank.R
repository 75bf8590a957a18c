# Reference numbers for survfuse.metrics.logrank.logrank_test and the Kaplan-Meier extras in
# survfuse.metrics.km (log-log confidence band, reverse-KM median follow-up, numbers at risk).
# Run from the repository root:  Rscript tests/reference/logrank.R
# Writes tests/reference/logrank_r.json (R version, survival version and the exact calls included).
#
#   lung:    Surv(time, status == 2) ~ ph.ecog   (rows with ph.ecog in 0..2; 3 groups)
#   veteran: Surv(time, status) ~ celltype        (4 groups)
#   pbc:     Surv(time, status == 2) ~ trt        (trial rows only; 2 groups)
library(survival)

source("tests/reference/json_helpers.R")  # num(), str_json(), obj()

lung <- subset(survival::lung, !is.na(ph.ecog) & ph.ecog <= 2)
pbc <- subset(survival::pbc, !is.na(trt))
sets <- list(
  lung = list(time = lung$time, event = lung$status == 2, group = lung$ph.ecog),
  veteran = list(time = veteran$time, event = veteran$status == 1,
                 group = as.integer(veteran$celltype)),
  pbc = list(time = pbc$time, event = pbc$status == 2, group = pbc$trt)
)

out <- list()
for (name in names(sets)) {
  d <- sets[[name]]
  sd <- survdiff(Surv(d$time, d$event) ~ d$group)
  df <- length(sd$n) - 1
  km <- survfit(Surv(d$time, d$event) ~ 1, conf.type = "log-log")
  rev <- survfit(Surv(d$time, !d$event) ~ 1)
  at <- c(0, 100, 250, 500, 1000)
  out[[name]] <- obj(list(
    time = num(d$time), event = num(as.integer(d$event)), group = num(d$group),
    chisq = num(sd$chisq), df = num(df), p = num(pchisq(sd$chisq, df, lower.tail = FALSE)),
    observed = num(sd$obs), expected = num(sd$exp),
    km_time = num(km$time), km_surv = num(km$surv),
    km_lower = num(km$lower), km_upper = num(km$upper),
    median_follow_up = num(summary(rev)$table["median"]),
    at = num(at), n_at_risk = num(summary(km, times = at, extend = TRUE)$n.risk)
  ))
}
meta <- obj(list(
  r_version = str_json(R.version.string),
  survival_version = str_json(as.character(packageVersion("survival"))),
  script = str_json("tests/reference/logrank.R"),
  note = str_json(paste(
    "survdiff(Surv(time, event) ~ group); survfit(..., conf.type = 'log-log') lower/upper;",
    "median follow-up = median of survfit(Surv(time, !event) ~ 1) (reverse Kaplan-Meier);",
    "n_at_risk = summary(km, times = at, extend = TRUE)$n.risk"))
))
writeLines(paste0("{\"meta\": ", meta, ", ", paste(paste0(str_json(names(out)), ": ", unlist(out)), collapse = ", "), "}"),
           "tests/reference/logrank_r.json")
