from .transforms import image_transform

__all__ = ["image_transform"]
