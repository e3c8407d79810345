"""The transformers back end: apply a recipe (``apply.py``), measure it (``measure.py``,
``accuracy.py``), all in a worker process (``pipeline.py``), driven by ``evaluator.py``.

Nothing here is imported by ``import evo_compress``: torch and transformers load only when
this back end is used.
"""
