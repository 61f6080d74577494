"""Former home of the field checks, kept so that existing imports work: they live in smoe.config.rules."""

from smoe.config.rules import (  # noqa: F401 (re-exported)
    check_types,
    fail,
    matches,
    non_negative,
    one_of,
    option,
    positive,
    type_name,
)
