"""hftl: Hugging Face-centric transfer learning. `hftl train CONFIG key=value ...`."""
__version__ = "0.1.0"
