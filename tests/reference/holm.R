# Reference values for survfuse.metrics.holm: R's stats::p.adjust(p, method = "holm").
# Run from the repository root:
#   Rscript tests/reference/holm.R [OUT.json]
# writes tests/reference/holm_r.json (or OUT.json): per case the exact R call, the input p-values
# and R's adjusted p-values, numbers printed with 17 significant digits, NA written as null.
# NA p-values (no test) stay NA and do not count in the number of comparisons (p.adjust's
# default n = number of non-NA p-values); survfuse passes them as NaN.

args <- commandArgs(trailingOnly = TRUE)
out_path <- if (length(args) >= 1) args[1] else "tests/reference/holm_r.json"

num <- function(x) {
  x <- as.numeric(x)
  paste0("[", paste(ifelse(is.na(x), "null", sprintf("%.17g", x)), collapse = ", "), "]")
}
str1 <- function(x) paste0("\"", gsub("\"", "\\\\\"", x), "\"")

cases <- list()
add_case <- function(name, call_text, p) {
  adj <- p.adjust(p, method = "holm")
  entry <- c(
    paste0("\"name\": ", str1(name)),
    paste0("\"call\": ", str1(call_text)),
    paste0("\"p\": ", num(p)),
    paste0("\"holm\": ", num(adj))
  )
  cases[[length(cases) + 1]] <<- paste0("{", paste(entry, collapse = ", "), "}")
  invisible(adj)
}

lit <- function(p) paste0("p.adjust(", paste(deparse(p, width.cutoff = 500), collapse = ""),
                          ", method = \"holm\")")

# The inputs of tests/test_experiment_evaluate.py::test_holm_matches_r_p_adjust (NaN -> NA).
p <- c(0.01, 0.04, 0.03, 0.2, NA, 0.005)
add_case("with_na", lit(p), p)
# Same p-values without the NA: identical adjustments (the NA does not count in m).
p <- c(0.01, 0.04, 0.03, 0.2, 0.005)
add_case("without_na", lit(p), p)
# Running maximum: the 2nd smallest times (m - 1) is below the smallest times m.
p <- c(0.011, 0.01, 0.5, 0.02)
add_case("running_max", lit(p), p)
# Tied p-values.
p <- c(0.02, 0.01, 0.01, 0.02, 0.3)
add_case("ties", lit(p), p)
# Capped at 1.
p <- c(0.3, 0.6, 0.9, 0.05)
add_case("capped_at_one", lit(p), p)
# One test; one test among NAs; exact 0 and 1.
add_case("single", lit(0.2), 0.2)
p <- c(NA, 0.03, NA)
add_case("one_among_na", lit(p), p)
p <- c(0, 1, 0.5, 0.001)
add_case("zero_and_one", lit(p), p)
# 25 random p-values (skewed to small values) with two NAs.
set.seed(2026)
p <- runif(25)^3
p[c(4, 17)] <- NA
add_case("random_25_with_na",
         "set.seed(2026); p <- runif(25)^3; p[c(4, 17)] <- NA; p.adjust(p, method = \"holm\")", p)

out <- paste0("{\n\"r_version\": ", str1(R.version.string),
  ",\n\"script\": \"tests/reference/holm.R\"",
  ",\n\"note\": ", str1("p.adjust(p, method = 'holm') with the default n (number of non-NA p); null = NA"),
  ",\n\"cases\": [\n", paste(unlist(cases), collapse = ",\n"), "\n]\n}\n")
writeLines(out, out_path, sep = "")
cat("wrote", out_path, "with", length(cases), "cases\n")
