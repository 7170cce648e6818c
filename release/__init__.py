"""MediLoRA release."""
