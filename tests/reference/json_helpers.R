# JSON writers shared by the reference scripts (sourced from the repository root).
num <- function(x) {
  x <- as.numeric(x)
  paste0("[", paste(ifelse(is.na(x), "null", sprintf("%.17g", x)), collapse = ", "), "]")
}
str_json <- function(x) paste0("\"", gsub("\"", "\\\\\"", x), "\"")
obj <- function(items) {
  paste0("{", paste(paste0(str_json(names(items)), ": ", unlist(items)), collapse = ", "), "}")
}
