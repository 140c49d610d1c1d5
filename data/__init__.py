"""Example data sets. Add yours here and point `conf/data/<name>.yaml` at it with `_target_`.

A data set for this template is a map-style `torch.utils.data.Dataset` (the resumable sampler
hands out indices). Any randomness in `__getitem__` (augmentation) should be derived from the
index and epoch, not from a worker's RNG, for resumption to be bitwise exact.
"""
