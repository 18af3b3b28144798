"""The IR every later stage shares: the mask algebra (one file per primitive, built into a
registry), token permutations, block classification and block tables, the plan of one bound
attention, dtypes, and the semantics of data-dependent block selection. Imports nothing above it."""
