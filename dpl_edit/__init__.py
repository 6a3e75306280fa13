"""dpl-edit: text-based editing of real images with Dynamic Prompt Learning."""

__version__ = "0.1.0"
