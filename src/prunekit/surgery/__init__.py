"""Physical edits of a model, each of which also updates the config (or the shape manifest) to match.

- ``linear``: the one Conv1D-aware slicer of a linear layer (rows, columns, leading slices, biases).
- ``config``: per-block config views, models built on meta, and ``config_mismatches``: the proof that a
  config describes a model's weights, which every edit that rewrites a config runs.
- ``width``: MLP neurons and attention heads of a block; a uniform result written into the config.
- ``depth``: whole blocks, or a block's attention or MLP sub-layer.
- ``hidden``: what touches the residual stream (``stream``); SliceGPT's rotation and slicing of it.
- ``channels``: Minitron's hidden-size pruning: residual channels deleted exactly as if zeroed (RMSNorm corrected).
"""
