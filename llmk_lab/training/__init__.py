"""Training craft, each option off by default: best-checkpoint selection and early stopping,
layer-wise learning-rate decay, adaptive weight decay, adversarial training, cross-layer pooling."""
