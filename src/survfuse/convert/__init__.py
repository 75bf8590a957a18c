"""Real cohorts into survfuse's inputs: INSPECT's release -> cohort table, CT index, flat MEDS.

`convert_inspect` (also `survfuse convert inspect`) converts the Stanford INSPECT release;
`flatten_meds` converts nested MEDS (0.1 / 0.2) to the current flat schema on its own. Errors in
the inputs are `ConversionError` (a ValueError) naming the file, the row and the column.
"""

from survfuse.convert.inspect import ConversionResult, convert_inspect
from survfuse.convert.meds_nested import DEFAULT_DEATH_CODES, FlattenResult, flatten_meds
from survfuse.convert.tables import ConversionError

__all__ = [
    "DEFAULT_DEATH_CODES",
    "ConversionError",
    "ConversionResult",
    "FlattenResult",
    "convert_inspect",
    "flatten_meds",
]
