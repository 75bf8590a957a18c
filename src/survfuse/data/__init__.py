"""Data layer: cohort tables, splits, MEDS EHR, CT imaging and the cohort simulator."""
