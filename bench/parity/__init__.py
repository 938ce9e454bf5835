"""Float64 parity of this library against the authors' code: ``python -m bench.parity``.

Each reference implementation is imported at run time from a git-ignored folder holding the
checkouts by repository name (``--ref-dir``, or the environment variable
``CONTSUP_REFERENCE_DIR``; ``scripts/fetch-references.sh`` fills it), never copied. See
:mod:`bench.parity.core` (name map, BatchNorm randomisation, comparison),
:mod:`bench.parity.contsup` (github.com/Tab-ct/ContSup) and docs/fidelity.md.
"""
