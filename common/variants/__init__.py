"""Variants stage: the named pipeline configurations (runtime + options) that 05 and 06 compare."""
