"""Export: Keras 3 models to TensorFlow.js and TFLite, each artifact verified against Keras."""
