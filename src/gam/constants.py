"""Constants shared by the models, the data pipeline and the losses (no imports: every layer may
use this module)."""

IGNORE_INDEX = -100  # target id that every loss skips (``F.cross_entropy``'s ignore_index)
