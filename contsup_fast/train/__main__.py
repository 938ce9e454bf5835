"""``python -m contsup_fast.train``: the training command line (:func:`contsup_fast.train.main`)."""
from . import main

main()
