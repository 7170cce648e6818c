"""MediLoRA recipes."""
