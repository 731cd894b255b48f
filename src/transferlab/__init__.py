"""transferlab: reproducible transfer learning for image classification."""

__version__ = "0.1.0"
