"""The qcow2 format: pure structures, bytes in and values out, no I/O.

Everything here follows docs/interop/qcow2.txt and QEMU's names. Nothing in
this package opens a file, logs, or locks; ``source`` arguments only name the
file in error messages.
"""

from ._constants import *  # noqa: F403
from ._constants import __all__ as _constants_all
from ._header import (
    MIN_HEADER_PROBE,
    FeatureName,
    HeaderExtension,
    Qcow2Header,
    cluster_size_of,
    l1_entries_for,
    parse_header,
    unknown_extensions,
    validate_header,
)
from ._layout import NewImageLayout, plan_new_image
from ._tables import *  # noqa: F403
from ._tables import __all__ as _tables_all

__all__ = [
    *_constants_all,
    *_tables_all,
    "MIN_HEADER_PROBE",
    "FeatureName",
    "HeaderExtension",
    "NewImageLayout",
    "Qcow2Header",
    "cluster_size_of",
    "l1_entries_for",
    "parse_header",
    "plan_new_image",
    "unknown_extensions",
    "validate_header",
]
