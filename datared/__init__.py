"""datared: the machinery behind the datared tutorial book.

One module, one job (``CONTRIBUTING.md`` has the map): ``frame`` (the calibrated-frame model
and header values), ``reduction`` (master frames, calibration), ``detection`` (backgrounds and
stars), ``wcsfit`` / ``solve`` / ``astrometry_net`` (astrometry), ``photometry``, ``catalogs``,
``io`` (the night's files, prerequisites, skip logs), ``progress`` (progress bars),
``checks`` and ``errors``; the simulator of the sample night lives apart in ``datared.sim``.
Nothing here reads the book's settings.
"""

__version__ = "0.1.0"
