"""Central training: datasets, the Keras model zoo, fitting, evaluation reports and plots.

Importing this package is cheap; TensorFlow is imported only by the functions that need it.
"""
