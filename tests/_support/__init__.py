"""Helpers the tests share: imported as ``_support`` by test modules, ``conftest.py`` and the worker scripts.

``pyproject.toml`` puts ``tests/`` on ``sys.path`` for pytest (``pythonpath``); a worker started as
``python tests/x_worker.py`` has ``tests/`` on it as its script's folder. Test modules import only from here (and
from ``lightning_skew``), never from one another; what several files repeat belongs here, or in ``conftest.py`` as a
fixture.

- ``launch``: several ranks of a worker script, started as torchrun would (``launch``, ``finish_rank``).
- ``small``: the small synthetic DLRM setup (``make_data``, ``make_model``, ``RecordLosses``) and ``quiet_trainer``.
- ``cli``: the ``lightning-skew`` command in a fresh interpreter, and ``SMALL`` recipe sizes.
- ``resume_fit``: the mid-epoch resume check every DataModule passes.
- ``composition``, ``stale``, ``hot_cold``, ``criteo_files``, ``columnar_files``, ``user_models``: what the tests of
  one area share.
"""
