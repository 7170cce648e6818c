"""MediLoRA CLI and shared machinery."""
__version__ = "0.1.0"
