"""Kernels several optimizers share (STYLE.md: compose, don't copy): Adam moments, factored second moments,
Newton–Schulz orthogonalization, eigen/SVD bases. Each is a pure function of tensors."""
