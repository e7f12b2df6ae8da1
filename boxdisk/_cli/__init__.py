"""The pieces of the ``boxdisk`` command line (entry point: :mod:`boxdisk.cli`)."""
