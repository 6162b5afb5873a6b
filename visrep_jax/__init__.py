"""visrep_jax: a JAX/Flax framework for visual representation learning research.

Importing the package is cheap: TensorFlow is imported lazily by the data pipeline only.
"""

__version__ = "0.1.0"
