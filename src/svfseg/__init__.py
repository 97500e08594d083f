"""svfseg: Singular Value Fine-tuning for few-shot segmentation and for any PyTorch model."""
__version__ = "0.1.0"
